#!/bin/sh
# Data-parallel training across two "hosts" on one machine: two network namespaces joined
# by a veth pair (10.77.0.1 and 10.77.0.2, nothing else between them), MPICH's Hydra
# launching through its ssh launcher with a stand-in for ssh that enters the namespace of
# the address it is given. Rank 1 sees only its veth; the gradient all-reduce crosses it.
# Needs root (ip netns) and the mpi extra. Usage: sh bench/multihost.sh CORPUS [OUTPUT]
set -eu
corpus=${1:?usage: sh bench/multihost.sh CORPUS [OUTPUT]}
out=${2:-runs/multihost}
work=$(mktemp -d)
cleanup() { ip netns del rga 2>/dev/null || true; ip netns del rgb 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ip netns add rga
ip netns add rgb
ip link add vrga type veth peer name vrgb
ip link set vrga netns rga
ip link set vrgb netns rgb
ip -n rga addr add 10.77.0.1/24 dev vrga
ip -n rgb addr add 10.77.0.2/24 dev vrgb
for ns in rga rgb; do ip -n $ns link set lo up; done
ip -n rga link set vrga up
ip -n rgb link set vrgb up

cat > "$work/ssh" <<'SSH'
#!/bin/sh
# ssh as Hydra calls it (ssh [-x] HOST COMMAND...), into the host's namespace instead
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
  10.77.0.1) ns=rga ;;
  10.77.0.2) ns=rgb ;;
  *) echo "no such host: $host" >&2; exit 255 ;;
esac
echo "launching on $host (namespace $ns)" >&2
exec ip netns exec "$ns" sh -c "$*"
SSH
chmod +x "$work/ssh"
printf '10.77.0.1:1\n10.77.0.2:1\n' > "$work/hosts"

# the run's own settings after the corpus and output; --threads 1: both "hosts" share 2 cores
ip netns exec rga mpiexec -launcher ssh -launcher-exec "$work/ssh" -iface vrga \
    -f "$work/hosts" -n 2 \
    rustgpt-cli train --text "$corpus" --tokenizer char --arch gpt --batch-size 12 \
    --max-iters 200 --eval-interval 100 --eval-iters 5 --threads 1 --overwrite --output "$out"
