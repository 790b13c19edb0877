#!/usr/bin/env bash
# Code-import throughput: N codes (default 1,000,000) through POST /admin/v1/products/{sku}/codes
# of a release build, into local Postgres and Redis. Prints codes per second.
#
#   loadtests/import-bench.sh [N]
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
n=${1:-1000000}
start_gateway
product bench
code_file "$n" BENCH
start=$(date +%s.%N)
report=$(import_codes bench)
end=$(date +%s.%N)
python3 - "$report" "$start" "$end" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); secs = float(sys.argv[3]) - float(sys.argv[2])
print(f"imported {r['imported']} codes in {secs:.2f} s: {r['imported'] / secs:,.0f} codes/s (goal 50,000)")
PY
