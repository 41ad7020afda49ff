package image

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/layout"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"

	"github.com/unlockrd/unlockrd/initramfs/host/image/imagetest"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/host/kmod"
	"github.com/unlockrd/unlockrd/initramfs/host/yamlconfig"
)

func kernelCache(t *testing.T) string { return kernelcache.ForTest(t).Dir }

func smokeInit(t *testing.T) string { return imagetest.SmokeInit(t) }

func writeConfig(t *testing.T, dir, text string) string { return imagetest.WriteConfig(t, dir, text) }

const goodConfig = imagetest.GoodConfig

func build(t *testing.T, o Options) *Report {
	t.Helper()
	rep, err := Build(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func TestBuildReproducible(t *testing.T) {
	kc := kernelCache(t)
	init := smokeInit(t)
	src := t.TempDir()
	cfg := writeConfig(t, src, goodConfig)
	out := t.TempDir()
	for _, comp := range []Compression{Xz, Zstd, Gzip, None} {
		// Absolute paths, default TMPDIR.
		a := filepath.Join(out, "a-"+string(comp))
		build(t, Options{ConfigFile: cfg, ModulesDir: filepath.Join(kc, "modules"), Init: init, Output: a, Compression: comp})

		// Relative paths from another working directory and another
		// TMPDIR; a copy of the module tree reached through a symbolic
		// link; a copy of the init elsewhere.
		other := t.TempDir()
		t.Setenv("TMPDIR", t.TempDir())
		if err := os.Symlink(filepath.Join(kc, "modules"), filepath.Join(other, "mods")); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(init)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(other, "unlockrd-init"), b, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(other, "c.yaml"), []byte(goodConfig), 0o600); err != nil {
			t.Fatal(err)
		}
		chdir(t, other)
		build(t, Options{ConfigFile: "c.yaml", ModulesDir: "mods", Init: "unlockrd-init", Output: "b.img", Compression: comp})

		ab, _ := os.ReadFile(a)
		bb, _ := os.ReadFile(filepath.Join(other, "b.img"))
		if len(ab) == 0 || !bytes.Equal(ab, bb) {
			t.Errorf("%s: two builds of the same inputs differ (%d and %d bytes)", comp, len(ab), len(bb))
		}
		st, err := os.Stat(a)
		if err != nil || st.Mode().Perm() != 0o644 {
			t.Errorf("%s: image mode %v (%v), want 0644", comp, st.Mode(), err)
		}
	}
}

func chdir(t *testing.T, dir string) {
	t.Helper()
	old, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chdir(old) })
}

func TestSourceDateEpoch(t *testing.T) {
	kc := kernelCache(t)
	dir := t.TempDir()
	cfg := writeConfig(t, dir, goodConfig)
	o := Options{ConfigFile: cfg, ModulesDir: filepath.Join(kc, "modules"), Init: smokeInit(t), Compression: None}
	o.Output = filepath.Join(dir, "zero.img")
	build(t, o)
	o.Output, o.MTime = filepath.Join(dir, "epoch.img"), 1700000000
	build(t, o)
	for file, want := range map[string]int64{"zero.img": 0, "epoch.img": 1700000000} {
		c, err := ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range c.Entries {
			if e.MTime.Unix() != want {
				t.Fatalf("%s: %s has mtime %v, want %d", file, e.Name, e.MTime, want)
			}
		}
	}
	for in, want := range map[string]int64{"": 0, "0": 0, "1700000000": 1700000000} {
		if got, err := ParseSourceDateEpoch(in); err != nil || got != want {
			t.Errorf("ParseSourceDateEpoch(%q) = %d, %v", in, got, err)
		}
	}
	for _, bad := range []string{"-1", "yesterday", "1.5", "99999999999"} {
		if _, err := ParseSourceDateEpoch(bad); err == nil {
			t.Errorf("ParseSourceDateEpoch(%q) accepted", bad)
		}
	}
}

func TestBadConfigWritesNoImage(t *testing.T) {
	for _, tc := range imagetest.BadConfigs {
		t.Run(tc.Name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := writeConfig(t, dir, tc.YAML)
			for _, out := range []string{"new.img", "existing.img"} {
				out = filepath.Join(dir, out)
				if strings.HasSuffix(out, "existing.img") {
					os.WriteFile(out, []byte("old image"), 0o644)
				}
				// No module tree and no init are needed to reject a
				// configuration: it is checked first.
				_, err := Build(context.Background(), Options{ConfigFile: cfg, ModulesDir: "/nonexistent", Init: "/nonexistent", Output: out})
				if err == nil || !strings.Contains(err.Error(), cfg+": "+tc.Field) {
					t.Fatalf("err = %v, want it to name %s: %s", err, cfg, tc.Field)
				}
			}
			assertFiles(t, dir, "existing.img", "unlockrd.yaml")
			if b, _ := os.ReadFile(filepath.Join(dir, "existing.img")); string(b) != "old image" {
				t.Error("an existing image was touched by a failed build")
			}
		})
	}
}

// assertFiles checks that dir holds exactly these files: no image, no
// temporary file left behind.
func assertFiles(t *testing.T, dir string, want ...string) { imagetest.AssertFiles(t, dir, want...) }

func TestFailedBuildLeavesNothing(t *testing.T) {
	kc := kernelCache(t)
	dir := t.TempDir()
	cfg := writeConfig(t, dir, goodConfig)
	o := Options{ConfigFile: cfg, ModulesDir: filepath.Join(kc, "modules"), Init: smokeInit(t), Output: filepath.Join(dir, "x.img")}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Build(ctx, o); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	// A module that exists nowhere.
	cfg2 := filepath.Join(dir, "unlockrd.yaml")
	os.WriteFile(cfg2, []byte(strings.Replace(goodConfig, "ext4]", "ext4, no_such_mod]", 1)), 0o644)
	if _, err := Build(context.Background(), o); err == nil || !strings.Contains(err.Error(), "no_such_mod") {
		t.Fatalf("err = %v, want it to name no_such_mod", err)
	}
	// An init the kernel could not run.
	os.WriteFile(cfg2, []byte(goodConfig), 0o644)
	o.Init = cfg2
	if _, err := Build(context.Background(), o); err == nil || !strings.Contains(err.Error(), "not an ELF") {
		t.Fatalf("err = %v", err)
	}
	assertFiles(t, dir, "unlockrd.yaml")
}

func TestReadRoundTrip(t *testing.T) {
	kc := kernelCache(t)
	dir := t.TempDir()
	cfgPath := writeConfig(t, dir, goodConfig)
	initPath := smokeInit(t)
	for _, comp := range []Compression{Xz, Zstd, Gzip, None} {
		out := filepath.Join(dir, string(comp)+".img")
		rep := build(t, Options{ConfigFile: cfgPath, ModulesDir: filepath.Join(kc, "modules"), Init: initPath, Output: out, Compression: comp, MTime: 42})
		c, err := ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if c.Compression != comp || c.Uncompressed != rep.Uncompressed {
			t.Errorf("read %s, %d bytes; built %s, %d bytes", c.Compression, c.Uncompressed, comp, rep.Uncompressed)
		}
		if st, _ := os.Stat(out); st.Size() != rep.Compressed {
			t.Errorf("report says %d bytes, file has %d", rep.Compressed, st.Size())
		}
		cfg, _ := yamlconfig.Parse([]byte(goodConfig))
		want, _ := cfg.Embed()
		if !bytes.Equal(c.Config, want) {
			t.Errorf("embedded config\n%s\nwant\n%s", c.Config, want)
		}
		if _, err := config.LoadEmbedded(c.Config); err != nil {
			t.Error(err)
		}
		rel, _ := os.ReadFile(filepath.Join(kc, "release"))
		if c.Release != strings.TrimSpace(string(rel)) || rep.Release != c.Release {
			t.Errorf("release %q, report %q, cache %q", c.Release, rep.Release, rel)
		}
		initBin, _ := os.ReadFile(initPath)
		if b, ok := c.File("init"); !ok || !bytes.Equal(b, initBin) || int64(len(b)) != rep.InitSize {
			t.Error("init differs from the input")
		}

		tree, err := kmod.Open(filepath.Join(kc, "modules"))
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Modules) != len(rep.Modules) || len(c.Modules) == 0 {
			t.Fatalf("modules.json has %d modules, report %d", len(c.Modules), len(rep.Modules))
		}
		var modSize int64
		for i, m := range c.Modules {
			km := rep.Modules[i]
			wantPath := "lib/modules/" + c.Release + "/" + km.Path
			if m.Name != km.Name || m.Path != wantPath || m.Optional != km.Optional || !reflect.DeepEqual(m.Deps, km.Deps) {
				t.Errorf("modules.json[%d] = %+v, want %+v at %s", i, m, km, wantPath)
			}
			b, ok := c.File(m.Path)
			orig, err := tree.ReadModule(km)
			if err != nil || !ok || !bytes.Equal(b, orig) {
				t.Errorf("%s: not the module file (%v)", m.Path, err)
			}
			modSize += int64(len(b))
		}
		if modSize != rep.ModulesSize {
			t.Errorf("modules size %d, report %d", modSize, rep.ModulesSize)
		}

		seen := map[string]Entry{}
		inos := map[uint64]bool{}
		var names []string
		for _, e := range c.Entries {
			seen[e.Name] = e
			names = append(names, e.Name)
			if e.UID != 0 || e.GID != 0 || e.MTime.Unix() != 42 || inos[e.Ino] {
				t.Errorf("%s: uid %d gid %d mtime %v ino %d (duplicate %v)", e.Name, e.UID, e.GID, e.MTime, e.Ino, inos[e.Ino])
			}
			inos[e.Ino] = true
			if d := filepathDir(e.Name); d != "." {
				if p, ok := seen[d]; !ok || !p.Mode.IsDir() {
					t.Errorf("%s comes before its folder %s", e.Name, d)
				}
			}
		}
		// Sorted, in two runs: what does not depend on the module tree,
		// then the modules with their load list, release and folders
		// (written while the closure was resolved, then after it).
		tailOnly := func(n string) bool {
			return n == "lib" || n == layout.ModulesRoot || strings.HasPrefix(n, layout.ModulesRoot+"/") ||
				n == layout.ModulesPath || n == layout.ReleasePath
		}
		k := slices.Index(names, layout.ModulesPath) // the tail's first name
		if k < 0 {
			k = len(names)
		}
		if !sort.StringsAreSorted(names[:k]) || !sort.StringsAreSorted(names[k:]) {
			t.Errorf("entries are not sorted in two runs: %q", names)
		}
		if j := slices.IndexFunc(names[k:], func(n string) bool { return !tailOnly(n) }); j >= 0 {
			t.Errorf("%s comes after the modules", names[k+j])
		}
		for name, mode := range map[string]fs.FileMode{
			layout.InitPath: 0o755, layout.ConfigPath: 0o644, layout.ModulesPath: 0o644, layout.ReleasePath: 0o644,
			"dev": fs.ModeDir | 0o755, "proc": fs.ModeDir | 0o755, "sys": fs.ModeDir | 0o755,
			"run": fs.ModeDir | 0o755, "sysroot": fs.ModeDir | 0o755, "etc": fs.ModeDir | 0o755,
			"tmp":         fs.ModeDir | fs.ModeSticky | 0o777,
			"dev/console": fs.ModeDevice | fs.ModeCharDevice | 0o600,
		} {
			if e, ok := seen[name]; !ok || e.Mode != mode {
				t.Errorf("%s: mode %v (present %v), want %v", name, e.Mode, ok, mode)
			}
		}
		if e := seen["dev/console"]; e.Major != 5 || e.Minor != 1 {
			t.Errorf("dev/console is %d,%d, want 5,1", e.Major, e.Minor)
		}
	}
}

func filepathDir(p string) string {
	if i := strings.LastIndex(p, "/"); i >= 0 {
		return p[:i]
	}
	return "."
}

// A tree of compressed modules gives an image of plain ones, with a note
// saying why, once.
func TestBuildFromCompressedTree(t *testing.T) {
	kc := kernelCache(t)
	if _, err := exec.LookPath("zstd"); err != nil {
		t.Fatal("zstd not installed (Debian package zstd)")
	}
	src := filepath.Join(kc, "modules")
	tree, err := kmod.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := tree.Closure([]string{"virtio_blk", "ext4"})
	if err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	for _, f := range []string{"modules.builtin", "modules.builtin.modinfo"} {
		copyTo(t, filepath.Join(src, f), filepath.Join(dst, f))
	}
	for _, m := range mods {
		p := filepath.Join(dst, m.Path)
		copyTo(t, filepath.Join(src, m.Path), p)
		if out, err := exec.Command("zstd", "-q", "--rm", "-T1", p).CombinedOutput(); err != nil {
			t.Fatalf("zstd: %v %s", err, out)
		}
	}
	dir := t.TempDir()
	cfg := writeConfig(t, dir, strings.Replace(goodConfig, "[virtio_pci, virtio_blk, virtio_net, dm_crypt, ext4]", "[virtio_blk, ext4]", 1))
	var log ulogtest.Logger
	rep := build(t, Options{ConfigFile: cfg, ModulesDir: dst, Init: smokeInit(t), Output: filepath.Join(dir, "x.img"), Logger: &log})
	if n := strings.Count(log.String(), "stored uncompressed"); n != 1 {
		t.Errorf("the reason for storing modules uncompressed was printed %d times: %q", n, log.String())
	}
	c, err := ReadFile(filepath.Join(dir, "x.img"))
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range c.Modules {
		if !strings.HasSuffix(m.Path, ".ko") {
			t.Errorf("%s is not a plain module path", m.Path)
		}
		b, _ := c.File(m.Path)
		orig, err := tree.ReadModule(mods[i])
		if err != nil || !bytes.Equal(b, orig) {
			t.Errorf("%s: not the decompressed module (%v)", m.Path, err)
		}
	}
	if len(rep.Modules) != len(mods) {
		t.Errorf("%d modules, want %d", len(rep.Modules), len(mods))
	}
}

func copyTo(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Dir(to), 0o755)
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestParseCompression(t *testing.T) {
	for in, want := range map[string]Compression{"": Zstd, "xz": Xz, "zstd": Zstd, "gzip": Gzip, "none": None} {
		if got, err := ParseCompression(in); err != nil || got != want {
			t.Errorf("ParseCompression(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"lz4", "XZ", "bzip2"} {
		if _, err := ParseCompression(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if _, err := Read(strings.NewReader("hello, world")); err == nil || !strings.Contains(err.Error(), "not an initramfs") {
		t.Errorf("Read(garbage) = %v", err)
	}
}

// TestQEMUBoot boots Debian's kernel on each compressed image: the kernel
// must unpack it, run /init with a console, and load every module in the
// order of modules.json.
func TestQEMUBoot(t *testing.T) {
	kc := kernelCache(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("qemu-system-x86_64 not installed (Debian package qemu-system-x86): %v", err)
	}
	dir := t.TempDir()
	cfg := writeConfig(t, dir, goodConfig)
	for _, comp := range []Compression{Xz, Zstd, Gzip} {
		img := filepath.Join(dir, string(comp)+".img")
		build(t, Options{ConfigFile: cfg, ModulesDir: filepath.Join(kc, "modules"), Init: smokeInit(t), Output: img, Compression: comp})
		// TCG on a shared machine: allow minutes, but stay within the
		// test binary's own deadline.
		timeout := 5 * time.Minute
		if d, ok := t.Deadline(); ok && time.Until(d)/2 < timeout {
			timeout = time.Until(d) / 2
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		start := time.Now()
		out, err := exec.CommandContext(ctx, qemu,
			"-accel", "tcg", "-cpu", "max", "-m", "1024", "-nographic", "-no-reboot",
			"-kernel", filepath.Join(kc, "vmlinuz"), "-initrd", img,
			"-append", "console=ttyS0 panic=-1").CombinedOutput()
		cancel()
		log := string(out)
		if !strings.Contains(log, "UNLOCKRD-SMOKE-OK") {
			t.Fatalf("%s image: no marker after %v (qemu: %v); console:\n%s", comp, time.Since(start).Round(time.Second), err, tail(log, 60))
		}
		if !strings.Contains(log, "failed-required=[]") {
			t.Errorf("%s image: required modules failed to load:\n%s", comp, tail(log, 30))
		}
		for _, l := range strings.Split(log, "\n") {
			if strings.HasPrefix(l, "smokeinit:") {
				t.Logf("%s: %s", comp, strings.TrimSpace(l))
			}
		}
		t.Logf("%s image booted in %v", comp, time.Since(start).Round(time.Millisecond))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func TestModeString(t *testing.T) {
	for mode, want := range map[fs.FileMode]string{
		0o755:                                     "-rwxr-xr-x",
		fs.ModeDir | fs.ModeSticky | 0o777:        "drwxrwxrwt",
		fs.ModeDir | fs.ModeSticky | 0o770:        "drwxrwx--T",
		fs.ModeDevice | fs.ModeCharDevice | 0o600: "crw-------",
		fs.ModeDevice | 0o660:                     "brw-rw----",
		fs.ModeSetuid | 0o755:                     "-rwsr-xr-x",
		fs.ModeSymlink | 0o777:                    "lrwxrwxrwx",
	} {
		if got := (Entry{Mode: mode}).ModeString(); got != want {
			t.Errorf("%v: %q, want %q", mode, got, want)
		}
	}
	// The cpio mode bits convert both ways.
	if got := fileMode(0o41777); got != fs.ModeDir|fs.ModeSticky|0o777 {
		t.Errorf("fileMode(041777) = %v", got)
	}
}

// TestCipherAcceleration: by default the image carries the architecture's
// accelerated AES driver and what it needs, as optional modules loaded
// before dm_crypt, on every cached kernel; no_cipher_acceleration leaves
// them out with a warning that says what it costs, and contradicts listing
// one of them.
func TestCipherAcceleration(t *testing.T) {
	init := smokeInit(t)
	kernelcache.Each(t, func(t *testing.T, k kernelcache.Files) {
		dir := t.TempDir()
		pos := func(mods []kmod.Module, name string) int {
			for i, m := range mods {
				if m.Name == name {
					return i
				}
			}
			return -1
		}
		rep := build(t, Options{ConfigFile: writeConfig(t, dir, goodConfig), ModulesDir: k.Modules, Init: init,
			Output: filepath.Join(dir, "default.img"), Compression: None})
		a, d := pos(rep.Modules, "aesni_intel"), pos(rep.Modules, "dm_crypt")
		if a < 0 || d < 0 || a > d {
			t.Fatalf("default image: aesni_intel at %d, dm_crypt at %d in %v: want aesni_intel before dm_crypt", a, d, rep.Modules)
		}
		if !rep.Modules[a].Optional {
			t.Errorf("aesni_intel is not optional: a CPU without AES-NI would fail the boot")
		}
		if !slices.Contains(rep.Modules[d].Deps, "aesni_intel") {
			t.Errorf("dm_crypt's deps %v lack aesni_intel: a mapping could be made before it registers", rep.Modules[d].Deps)
		}
		for _, dep := range []string{"crypto_simd", "cryptd"} {
			if i := pos(rep.Modules, dep); i < 0 || i > a {
				t.Errorf("%s at %d, aesni_intel at %d: want it before", dep, i, a)
			}
		}

		optOut := goodConfig + "no_cipher_acceleration: true\n"
		log := ulogtest.New(t)
		rep = build(t, Options{ConfigFile: writeConfig(t, dir, optOut), ModulesDir: k.Modules, Init: init,
			Output: filepath.Join(dir, "generic.img"), Compression: None, Logger: log})
		for _, m := range []string{"aesni_intel", "crypto_simd", "cryptd"} {
			if pos(rep.Modules, m) >= 0 {
				t.Errorf("no_cipher_acceleration: image still carries %s", m)
			}
		}
		if pos(rep.Modules, "xts") < 0 {
			t.Errorf("no_cipher_acceleration dropped xts, which dm_crypt needs")
		}
		if !log.Contains("warning: no_cipher_acceleration: leaving out") || !log.Contains("aesni_intel") || !log.Contains("slower") {
			t.Errorf("no warning naming what is left out and what it costs:\n%s", log)
		}

		both := strings.Replace(optOut, "ext4]", "ext4, aesni-intel]", 1)
		_, err := Build(context.Background(), Options{ConfigFile: writeConfig(t, dir, both), ModulesDir: k.Modules, Init: init,
			Output: filepath.Join(dir, "both.img"), Compression: None})
		if err == nil || !strings.Contains(err.Error(), "modules[5]") || !strings.Contains(err.Error(), "no_cipher_acceleration") {
			t.Errorf("aesni_intel listed with no_cipher_acceleration: err %v, want one naming modules[5] and no_cipher_acceleration", err)
		}
	})
}
