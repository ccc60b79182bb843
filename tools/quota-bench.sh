#!/usr/bin/env bash
# End-to-end cost of the project quota: write throughput through a unionfs-rs mount with a quota
# set vs without, same run, alternating, median of N rounds (default 5).
# Usage: bash tools/quota-bench.sh [ROUNDS] [SIZE_MIB]      (root; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
mib=${2:-1024}
# shellcheck source=tools/lib-bench.sh
. tools/lib-bench.sh
bench_setup unionfs-qbench

run() { # $1 = name, rest = extra mount args; prints MB/s
  local d=$base/$1; shift
  rm -rf "$d"; mkdir -p "$d"/{l,u,w,m}
  "$bin" mount "$d/l" "$d/u" "$d/m" --workdir "$d/w" "$@"
  local t0 t1
  t0=$(date +%s.%N)
  dd if=/dev/zero of="$d/m/file" bs=1M count="$mib" conv=fsync status=none
  t1=$(date +%s.%N)
  "$bin" umount "$d/m"
  sleep 0.2
  python3 -c "print(f'{$mib*1.048576/($t1-$t0):.0f}')"
}

declare -a plain quota
run warmup >/dev/null  # the first write after boot/build is slower for both
for ((i = 0; i < rounds; i++)); do
  plain+=("$(run plain)")
  quota+=("$(run quota --size 1T --isoft 1000000)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
echo "samples: plain ${plain[*]} / quota ${quota[*]}"
mp=$(median "${plain[@]}")
mq=$(median "${quota[@]}")
echo "write ${mib} MiB + fsync, median of $rounds rounds (MB/s): no quota $mp, quota $mq"
python3 -c "print(f'quota cost: {100*(1-$mq/$mp):.1f}% of throughput')"
echo "machine: $(nproc) vCPU, $(uname -r), $(df -T /var/tmp | awk 'NR==2{print $2}') under /var/tmp"
