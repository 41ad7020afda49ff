package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// benchUnlock compares unlocking a cryptsetup-default argon2id keyslot
// (argon2id, 4 lanes, iterations benchmarked by cryptsetup for its 2 s
// default; memory held to 256 MiB so the run stays short) by unlockrd's
// keyslot code with `cryptsetup open --test-passphrase` on the same
// volume, on this host. Runs alternate between the two so load changes
// hit both alike. Ours is measured by `go test -bench` in the volumes
// package (the bench program does not link boot code), cryptsetup as the
// wall time of the command.
func benchUnlock(ctx context.Context, r *report) error {
	runs := 5
	if r.quick {
		runs = 2
	}
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		return fmt.Errorf("cryptsetup is required: %w", err)
	}
	dir, err := os.MkdirTemp("", "unlockrd-bench-unlock-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	img, kf := filepath.Join(dir, "vol.img"), filepath.Join(dir, "key")
	if err := os.WriteFile(kf, []byte("bench passphrase"), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		return err
	}
	if err := os.Truncate(img, 20<<20); err != nil {
		return err
	}
	format := exec.CommandContext(ctx, "cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode",
		"--pbkdf", "argon2id", "--pbkdf-memory", "262144", "--pbkdf-parallel", "4", "--key-file", kf, img)
	if out, err := format.CombinedOutput(); err != nil {
		return fmt.Errorf("cryptsetup luksFormat: %w\n%s", err, out)
	}
	root, err := harness.ModuleRoot()
	if err != nil {
		return err
	}
	testBin := filepath.Join(dir, "luks2.test")
	build := exec.CommandContext(ctx, "go", "test", "-c", "-o", testBin, "./unlock/luks2")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go test -c ./unlock/luks2: %w\n%s", err, out)
	}

	nsOp := regexp.MustCompile(`BenchmarkUnlockArgon2id\S*\s+\d+\s+(\d+) ns/op`)
	params := regexp.MustCompile(`keyslot 0: (argon2id time=\d+ memory=\d+KiB lanes=\d+)`)
	var ours, theirs []time.Duration
	var kdf string
	for i := 0; i < runs; i++ {
		start := time.Now()
		cs := exec.CommandContext(ctx, "cryptsetup", "open", "--test-passphrase", "--key-file", kf, img)
		if out, err := cs.CombinedOutput(); err != nil {
			return fmt.Errorf("cryptsetup open --test-passphrase: %w\n%s", err, out)
		}
		theirs = append(theirs, time.Since(start))

		gb := exec.CommandContext(ctx, testBin, "-test.run", "^$", "-test.bench", "^BenchmarkUnlockArgon2id$",
			"-test.benchtime", "1x", "-test.v")
		gb.Env = append(os.Environ(), "UNLOCKRD_BENCH_VOLUME="+img, "UNLOCKRD_BENCH_KEYFILE="+kf)
		out, err := gb.CombinedOutput()
		if err != nil {
			return fmt.Errorf("benchmark: %w\n%s", err, out)
		}
		m := nsOp.FindSubmatch(out)
		if m == nil {
			return fmt.Errorf("no ns/op in the benchmark output:\n%s", out)
		}
		ns, _ := strconv.ParseInt(string(m[1]), 10, 64)
		ours = append(ours, time.Duration(ns))
		if p := params.FindSubmatch(out); p != nil {
			kdf = string(p[1])
		}
	}
	so, st := summarize(ours), summarize(theirs)
	// cryptsetup caps lanes at the online CPUs and may lower memory to
	// meet its time target: the header says what was really made.
	r.printf("volume: LUKS2, cryptsetup defaults except --pbkdf-memory 262144 --pbkdf-parallel 4; made: %s (%d CPUs here)", kdf, runtime.NumCPU())
	r.printf("unlockrd unseal (go test -bench): %s", so)
	r.printf("cryptsetup open --test-passphrase: %s", st)
	ratio := so.median.Seconds() / st.median.Seconds()
	r.printf("ratio ours/cryptsetup: %.2f", ratio)
	r.target("unlock no slower than cryptsetup", so.median <= st.median,
		fmt.Sprintf("%.2fs vs %.2fs (%s)", so.median.Seconds(), st.median.Seconds(), strings.TrimSpace(kdf)))
	return nil
}
