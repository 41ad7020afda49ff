#!/usr/bin/env bash
# Runs every Go fuzz target in the tree for FUZZTIME each, one after the
# other, and reports executions per second; then the long differential run
# of the LUKS2 header reader against cryptsetup (LUKSDIFF_N cases).
# A crash stops the run with the failing input kept under testdata/fuzz.
set -euo pipefail
cd "$(dirname "$0")/../.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-5m}
LUKSDIFF_N=${LUKSDIFF_N:-20000}
LUKSDIFF_SEED=${LUKSDIFF_SEED:-$(date +%s)}
summary=()
while IFS=: read -r file _ decl; do
	name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"$decl")
	pkg=$(dirname "$file")
	echo "== $pkg $name ($FUZZTIME)"
	log=$(mktemp)
	if ! $GO test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" "$pkg" 2>&1 | tee "$log"; then
		echo "fuzz: $pkg $name FAILED" >&2
		exit 1
	fi
	last=$(grep -E 'execs: [0-9]+' "$log" | tail -1 || true)
	execs=$(sed -E 's/.*execs: ([0-9]+).*/\1/' <<<"$last")
	secs=$($GO run ./qemu-tests/setup/durationsecs "$FUZZTIME" 2>/dev/null || echo 0)
	rate=0
	[ -n "$execs" ] && [ "$secs" -gt 0 ] && rate=$((execs / secs))
	summary+=("$(printf '%-40s %-24s %10s execs %8s/s' "$pkg" "$name" "${execs:-?}" "$rate")")
	rm -f "$log"
done < <(grep -rn --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(' . | grep -v '^\./\.cache/' | sort)
echo "== differential: $LUKSDIFF_N cases, seed $LUKSDIFF_SEED"
LUKSDIFF_N=$LUKSDIFF_N LUKSDIFF_SEED=$LUKSDIFF_SEED $GO test -count=1 -timeout 2h -v -run '^TestDifferential$' ./unlock/luks2/luksdiff | grep -E 'cases:|^(--- |ok|FAIL|PASS)|cryptsetup (accepts|rejects)'
echo "== fuzz summary (FUZZTIME=$FUZZTIME)"
printf '%s\n' "${summary[@]}"
