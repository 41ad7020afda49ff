package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// benchBuild times `mkunlockrd build` for Debian 13's module tree as
// its package ships it (.ko.xz, no modules.dep: the builder reads every
// module's .modinfo for aliases) against the same tree after depmod, with
// the default modules. "cold" is a first build (empty user cache, so the
// alias scan runs), "warm" a later one (the scan comes from
// ~/.cache/unlockrd/kmod-aliases). Runs alternate; the target is the cold
// build without modules.dep at most 2× the build with it.
func benchBuild(ctx context.Context, r *report) error {
	runs := r.runs(3, 1)
	bins, err := harness.Binaries(ctx)
	if err != nil {
		return err
	}
	if _, err := exec.LookPath("depmod"); err != nil {
		return fmt.Errorf("depmod is required: %w", err)
	}
	k, err := harness.KernelNamed(kernelcache.Debian13)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(k.Modules, "modules.dep")); err == nil {
		return fmt.Errorf("%s has a modules.dep: the comparison needs the tree as packaged", k.Modules)
	}
	release := k.Release
	dir, err := os.MkdirTemp("", "unlockrd-bench-nodep-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The key-server values only have to pass validation (as in size).
	cfg := harness.ImageConfig{
		URLs: []string{"https://keys.example.net:8443/v1/keys/{host}"},
		Pins: []string{"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="},
	}
	cfgFile := filepath.Join(dir, "unlockrd.yaml")
	if err := os.WriteFile(cfgFile, []byte(cfg.YAML()), 0o644); err != nil {
		return err
	}
	// depmod writes beside kernel/, which stays the cache's (a link).
	depTree := filepath.Join(dir, "lib", "modules", release)
	if err := os.MkdirAll(depTree, 0o755); err != nil {
		return err
	}
	if err := os.Symlink(filepath.Join(k.Modules, "kernel"), filepath.Join(depTree, "kernel")); err != nil {
		return err
	}
	for _, f := range []string{"modules.builtin", "modules.builtin.modinfo", "modules.order"} {
		b, err := os.ReadFile(filepath.Join(k.Modules, f))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(depTree, f), b, 0o644); err != nil {
			return err
		}
	}
	if out, err := exec.CommandContext(ctx, "depmod", "-b", dir, release).CombinedOutput(); err != nil {
		return fmt.Errorf("depmod: %w\n%s", err, out)
	}
	warmCache := filepath.Join(dir, "cache-warm")
	// Each build's wall time, and its CPU time (user + system), which a
	// busy host inflates far less.
	var cpu [3][]time.Duration
	build := func(which int, tree, cache string) (time.Duration, error) {
		cmd := exec.CommandContext(ctx, bins.Mkunlockrd, "build", "-c", cfgFile, "-m", tree, "-o", filepath.Join(dir, "img"))
		cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+cache)
		start := time.Now()
		out, err := cmd.CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("mkunlockrd build -m %s: %w\n%s", tree, err, out)
		}
		took := time.Since(start)
		if which >= 0 {
			cpu[which] = append(cpu[which], cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime())
		}
		return took, nil
	}
	// One build fills the warm cache.
	if _, err := build(-1, k.Modules, warmCache); err != nil {
		return err
	}
	var cold, warm, dep []time.Duration
	for i := 0; i < runs; i++ {
		c, err := build(0, k.Modules, filepath.Join(dir, fmt.Sprintf("cache-cold-%d", i)))
		if err != nil {
			return err
		}
		d, err := build(1, depTree, warmCache)
		if err != nil {
			return err
		}
		w, err := build(2, k.Modules, warmCache)
		if err != nil {
			return err
		}
		cold, dep, warm = append(cold, c), append(dep, d), append(warm, w)
	}
	sc, sw, sd := summarize(cold), summarize(warm), summarize(dep)
	r.printf("mkunlockrd build for Debian 13 (%s, .ko.xz), default modules, %d alternated runs:", release, runs)
	cc, cd, cw := summarize(cpu[0]), summarize(cpu[1]), summarize(cpu[2])
	r.printf("  without modules.dep, first build (cold alias scan): %s; CPU %.2fs", sc, cc.median.Seconds())
	r.printf("  without modules.dep, later build (cached scan):     %s; CPU %.2fs", sw, cw.median.Seconds())
	r.printf("  with modules.dep (after depmod):                    %s; CPU %.2fs", sd, cd.median.Seconds())
	ratio := sc.median.Seconds() / sd.median.Seconds()
	r.printf("  ratio cold without / with modules.dep: %.2f wall, %.2f CPU (warm: %.2f wall, %.2f CPU)", ratio,
		cc.median.Seconds()/cd.median.Seconds(), sw.median.Seconds()/sd.median.Seconds(), cw.median.Seconds()/cd.median.Seconds())
	r.target("build without modules.dep ≤ 2× with it (first build)", ratio <= 2,
		fmt.Sprintf("%.1fs vs %.1fs, %.2f×", sc.median.Seconds(), sd.median.Seconds(), ratio))
	return nil
}
