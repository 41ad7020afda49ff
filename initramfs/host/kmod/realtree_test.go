package kmod

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// wantSet is the set the image of DESIGN §3 asks for.
var wantSet = []string{"virtio_pci", "virtio_blk", "virtio_net", "dm_crypt", "ext4"}

// kernelTree returns the module tree that qemu-tests/setup/fetch-kernel.sh
// extracts. Its absence fails the test: the real tree is what these tests
// are about, and a silent skip would hide it. -short skips them.
func kernelTree(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: skipping tests on the real kernel module tree")
	}
	dir := kernelcache.ForTest(t).Modules
	if _, err := os.Stat(filepath.Join(dir, "kernel")); err != nil {
		t.Fatalf("kernel module tree missing (%v): run make kernel (qemu-tests/setup/fetch-kernel.sh)", err)
	}
	return dir
}

func needTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s not installed (Debian packages: kmod, xz-utils, zstd): %v", name, err)
	}
}

// oracle is an independent reading of the tree through modinfo(8): the
// expected closure, which modules must be optional, and which modules must
// come before which.
type oracle struct {
	t        *testing.T
	dir      string
	files    map[string]string // name -> path
	builtin  map[string]bool
	aliases  map[string][]string // module -> its aliases, from one modinfo run
	set      map[string]bool
	required map[string]bool
	before   map[string][]string // module -> modules that must precede it
}

func newOracle(t *testing.T, dir string) *oracle {
	needTool(t, "modinfo")
	o := &oracle{t: t, dir: dir, files: map[string]string{}, builtin: map[string]bool{},
		set: map[string]bool{}, required: map[string]bool{}, before: map[string][]string{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.HasSuffix(p, ".ko") {
			o.files[strings.ReplaceAll(strings.TrimSuffix(filepath.Base(p), ".ko"), "-", "_")] = p
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Fields(string(b)) {
		o.builtin[strings.ReplaceAll(strings.TrimSuffix(filepath.Base(l), ".ko"), "-", "_")] = true
	}
	return o
}

func (o *oracle) field(name, field string) []string {
	out, err := exec.Command("modinfo", "-F", field, o.files[name]).Output()
	if err != nil {
		o.t.Fatalf("modinfo -F %s %s: %v", field, o.files[name], err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// providers runs modinfo once over every module of the tree to learn the
// aliases, the first time an alias has to be resolved.
func (o *oracle) providers(target string) []string {
	norm := func(s string) string { return strings.ReplaceAll(s, "-", "_") }
	if n := norm(target); o.files[n] != "" {
		return []string{n}
	} else if o.builtin[n] {
		return nil
	}
	if o.aliases == nil {
		o.aliases = map[string][]string{}
		var paths []string
		for _, p := range o.files {
			paths = append(paths, p)
		}
		sort.Strings(paths)
		for len(paths) > 0 {
			n := min(len(paths), 500)
			out, err := exec.Command("modinfo", paths[:n]...).Output()
			if err != nil {
				o.t.Fatalf("modinfo: %v", err)
			}
			paths = paths[n:]
			var cur string
			for _, l := range strings.Split(string(out), "\n") {
				k, v, _ := strings.Cut(l, ":")
				v = strings.TrimSpace(v)
				switch k {
				case "filename":
					cur = norm(strings.TrimSuffix(filepath.Base(v), ".ko"))
				case "alias":
					o.aliases[cur] = append(o.aliases[cur], v)
				}
			}
		}
	}
	var out []string
	for m, as := range o.aliases {
		for _, a := range as {
			if ok, _ := filepath.Match(norm(a), norm(target)); ok {
				out = append(out, m)
				break
			}
		}
	}
	sort.Strings(out)
	return out
}

// add walks modinfo's depends and softdep fields recursively, plus the
// builder's documented implications (dm_crypt needs xts, and carries
// aesni_intel as an optional acceleration).
func (o *oracle) add(name string, required bool) {
	if o.files[name] == "" {
		if o.builtin[name] {
			return
		}
		o.t.Fatalf("oracle: %s is not in the tree", name)
	}
	if o.set[name] && (o.required[name] || !required) {
		return
	}
	o.set[name] = true
	if required {
		o.required[name] = true
	}
	for _, d := range o.field(name, "depends") {
		for _, dd := range strings.Split(d, ",") {
			if dd = strings.ReplaceAll(dd, "-", "_"); dd != "" && !o.builtin[dd] {
				o.before[name] = append(o.before[name], dd)
				o.add(dd, required)
			}
		}
	}
	for _, line := range o.field(name, "softdep") {
		mode := ""
		for _, w := range strings.Fields(line) {
			switch w {
			case "pre:", "post:":
				mode = w
				continue
			}
			for _, p := range o.providers(w) {
				if mode == "pre:" {
					o.before[name] = append(o.before[name], p)
				} else {
					o.before[p] = append(o.before[p], name)
				}
				o.add(p, false)
			}
		}
	}
	if name == "dm_crypt" {
		o.before[name] = append(o.before[name], "xts")
		o.add("xts", required)
		if o.files["aesni_intel"] != "" {
			o.before[name] = append(o.before[name], "aesni_intel")
			o.add("aesni_intel", false)
		}
	}
}

// check compares a closure with the oracle: same modules, same optional
// flags, every ordering constraint honoured, and Deps equal to the
// transitive set of constraints.
func (o *oracle) check(got []Module) {
	t := o.t
	t.Helper()
	pos := map[string]int{}
	var names []string
	for i, m := range got {
		if _, dup := pos[m.Name]; dup {
			t.Errorf("%s appears twice", m.Name)
		}
		pos[m.Name] = i
		names = append(names, m.Name)
	}
	var want []string
	for n := range o.set {
		want = append(want, n)
	}
	sort.Strings(want)
	sorted := slices.Clone(names)
	sort.Strings(sorted)
	if !reflect.DeepEqual(sorted, want) {
		t.Fatalf("closure modules\n got %v\nwant %v", sorted, want)
	}
	var trans func(string, map[string]bool)
	trans = func(n string, into map[string]bool) {
		for _, d := range o.before[n] {
			if !into[d] {
				into[d] = true
				trans(d, into)
			}
		}
	}
	for _, m := range got {
		if m.Optional != !o.required[m.Name] {
			t.Errorf("%s: Optional = %v, want %v", m.Name, m.Optional, !o.required[m.Name])
		}
		for _, d := range o.before[m.Name] {
			if pos[d] >= pos[m.Name] {
				t.Errorf("%s (at %d) must come after %s (at %d)", m.Name, pos[m.Name], d, pos[d])
			}
		}
		wantDeps := map[string]bool{}
		trans(m.Name, wantDeps)
		gotDeps := map[string]bool{}
		last := -1
		for _, d := range m.Deps {
			gotDeps[d] = true
			if pos[d] <= last {
				t.Errorf("%s: Deps %v not in load order", m.Name, m.Deps)
			}
			last = pos[d]
		}
		if !reflect.DeepEqual(gotDeps, wantDeps) {
			t.Errorf("%s: Deps %v, want the set %v", m.Name, m.Deps, wantDeps)
		}
	}
}

func TestClosureMatchesModinfo(t *testing.T) {
	dir := kernelTree(t)
	tree, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if tree.HasModulesDep() {
		t.Fatal("the extracted Debian tree has no modules.dep, but Open found one")
	}
	rel, err := os.ReadFile(filepath.Join(dir, "..", "release"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := tree.Release(), strings.TrimSpace(string(rel)); got != want {
		t.Errorf("Release() = %q, want %q", got, want)
	}
	got, err := tree.Closure(wantSet)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range got {
		t.Logf("%-16s optional=%-5v %s deps=%v", m.Name, m.Optional, m.Path, m.Deps)
	}
	o := newOracle(t, dir)
	for _, n := range wantSet {
		o.add(n, true)
	}
	o.check(got)

	// The traps measured on this kernel, spelled out.
	pos := map[string]int{}
	for i, m := range got {
		pos[m.Name] = i
	}
	for _, n := range []string{"crc32c_generic", "crc32c_intel", "xts"} {
		if _, ok := pos[n]; !ok {
			t.Errorf("%s missing from the closure", n)
		}
	}
	if pos["crc32c_generic"] > pos["ext4"] {
		t.Error("crc32c_generic must be loaded before ext4 (softdep pre: crypto-crc32c)")
	}
	if !got[pos["crc32c_intel"]].Optional {
		t.Error("crc32c_intel is CPU-specific and must be optional")
	}
}

func TestClosureDeterministic(t *testing.T) {
	dir := kernelTree(t)
	var first []Module
	for i := 0; i < 3; i++ {
		tree, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tree.Closure(wantSet)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = got
		} else if !reflect.DeepEqual(got, first) {
			t.Fatalf("run %d differs:\n%v\n%v", i, got, first)
		}
	}
}

// copySubset copies the closure's modules (and a few unrelated ones) into
// a new tree at dst, compressing them with the command chosen by compress.
func copySubset(t *testing.T, src, dst string, mods []Module, compress func(i int, path string)) {
	t.Helper()
	paths := []string{"kernel/lib/libcrc32c.ko", "kernel/fs/fat/fat.ko", "kernel/drivers/virtio/virtio_balloon.ko"}
	for _, m := range mods {
		paths = append(paths, m.Path)
	}
	for i, p := range paths {
		to := filepath.Join(dst, p)
		copyFile(t, filepath.Join(src, p), to)
		compress(i, to)
	}
	for _, f := range []string{"modules.builtin", "modules.builtin.modinfo", "modules.order"} {
		copyFile(t, filepath.Join(src, f), filepath.Join(dst, f))
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// compressMix compresses the copied modules with xz (the way kernels built
// with CONFIG_MODULE_COMPRESS_XZ do), zstd, and, when a gzip module is
// allowed, gzip.
func compressMix(t *testing.T, withGzip bool) func(int, string) {
	needTool(t, "xz")
	needTool(t, "zstd")
	return func(i int, p string) {
		switch i % 4 {
		case 0:
			run(t, "xz", "-T1", "--check=crc32", "--lzma2=dict=1MiB", p)
		case 1:
			run(t, "zstd", "-q", "--rm", "-T1", p)
		case 2:
			if withGzip {
				run(t, "gzip", "-n", p)
			} else {
				run(t, "xz", "-T1", "--check=crc32", p)
			}
		}
	}
}

func TestClosureCompressedNoModulesDep(t *testing.T) {
	src := kernelTree(t)
	tree, err := Open(src)
	if err != nil {
		t.Fatal(err)
	}
	want, err := tree.Closure(wantSet)
	if err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	copySubset(t, src, dst, want, compressMix(t, true))
	ctree, err := Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	if ctree.HasModulesDep() {
		t.Fatal("copy has no modules.dep")
	}
	if ctree.Release() != tree.Release() {
		t.Errorf("Release() = %q, want %q", ctree.Release(), tree.Release())
	}
	got, err := ctree.Closure(wantSet)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for i := range got {
		kinds[filepath.Ext(got[i].Path)]++
		if StripCompression(got[i].Path) != want[i].Path {
			t.Errorf("module %d: path %s, want %s compressed", i, got[i].Path, want[i].Path)
		}
		g := got[i]
		g.Path = want[i].Path
		if !reflect.DeepEqual(g, want[i]) {
			t.Errorf("module %d: %+v, want %+v", i, got[i], want[i])
		}
		b, err := ctree.ReadModule(got[i])
		if err != nil {
			t.Fatal(err)
		}
		orig, err := tree.ReadModule(want[i])
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, orig) {
			t.Errorf("%s: decompressed contents differ from the original", got[i].Path)
		}
	}
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if kinds[ext] == 0 {
			t.Errorf("no %s module in the closure: the test does not test what it says (%v)", ext, kinds)
		}
	}
}

func TestClosureWithDepmod(t *testing.T) {
	src := kernelTree(t)
	needTool(t, "depmod")
	tree, err := Open(src)
	if err != nil {
		t.Fatal(err)
	}
	want, err := tree.Closure(wantSet)
	if err != nil {
		t.Fatal(err)
	}
	base := t.TempDir()
	dst := filepath.Join(base, "lib", "modules", tree.Release())
	// kmod here reads xz and zstd but not gzip modules.
	copySubset(t, src, dst, want, compressMix(t, false))
	run(t, "depmod", "-b", base, tree.Release())
	if _, err := os.Stat(filepath.Join(dst, "modules.dep")); err != nil {
		t.Fatal(err)
	}
	dtree, err := Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !dtree.HasModulesDep() {
		t.Fatal("modules.dep not used")
	}
	got, err := dtree.Closure(wantSet)
	if err != nil {
		t.Fatal(err)
	}
	o := newOracle(t, src)
	for _, n := range wantSet {
		o.add(n, true)
	}
	for i := range got {
		got[i].Path = StripCompression(got[i].Path)
	}
	o.check(got)
	if dtree.aliases == nil {
		t.Error("the alias index was not built (ext4's softdep is an alias)")
	}
}

func TestClosureMissingModule(t *testing.T) {
	tree, err := Open(kernelTree(t))
	if err != nil {
		t.Fatal(err)
	}
	_, err = tree.Closure([]string{"virtio_pci", "no-such-module"})
	if err == nil || !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "no-such-module") {
		t.Fatalf("err = %v, want ErrNotFound naming no-such-module", err)
	}
}

func TestClosureBuiltinAndAlias(t *testing.T) {
	tree, err := Open(kernelTree(t))
	if err != nil {
		t.Fatal(err)
	}
	// aes_generic and crc32 are built into Debian's kernel.
	got, err := tree.Closure([]string{"aes_generic", "crc32"})
	if err != nil || len(got) != 0 {
		t.Fatalf("built-in modules: %v, %v; want nothing", got, err)
	}
	// ext3 is an alias of ext4; dashes and underscores are the same.
	a, err := tree.Closure([]string{"ext3"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := tree.Closure([]string{"ext4"})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Errorf("ext3 → %v, want ext4's closure %v", a, b)
	}
	c, err := tree.Closure([]string{"dm-crypt"})
	if err != nil || len(c) == 0 || c[len(c)-1].Name != "dm_crypt" {
		t.Errorf("dm-crypt: %v, %v", c, err)
	}
	// An alias with two providers must be spelled out.
	if _, err := tree.Closure([]string{"crypto-crc32c"}); err == nil || !strings.Contains(err.Error(), "crc32c_intel") {
		t.Errorf("ambiguous alias: err = %v", err)
	}
}

func TestOpenNotModuleTree(t *testing.T) {
	_, err := Open(t.TempDir())
	if !errors.Is(err, ErrNotModuleTree) || !strings.Contains(err.Error(), "not a module tree") {
		t.Fatalf("err = %v", err)
	}
	_, err = Open(filepath.Join(t.TempDir(), "absent"))
	if !errors.Is(err, ErrNotModuleTree) {
		t.Fatalf("err = %v", err)
	}
}

// TestClosureSameWithoutModulesDep: on every cached kernel (Debian 13's
// with .ko.xz modules, Debian 12's plain), the closure read from the
// modules themselves equals the one read from depmod's files for the same
// tree: same modules, paths, optional flags and dependency sets. (The load
// order may differ where both are right: modules.dep lists a module's
// dependencies in depmod's order, .modinfo in the linker's.)
func TestClosureSameWithoutModulesDep(t *testing.T) {
	needTool(t, "depmod")
	kernelcache.Each(t, func(t *testing.T, k kernelcache.Files) {
		// A cold alias cache: the scan itself is under test.
		t.Setenv("XDG_CACHE_HOME", t.TempDir())
		tree, err := Open(k.Modules)
		if err != nil {
			t.Fatal(err)
		}
		if tree.HasModulesDep() {
			t.Fatalf("%s has a modules.dep: the test needs a tree without one", k.Modules)
		}
		// depmod writes its files beside kernel/, which stays the cache's
		// (a symbolic link: the tree is not copied).
		base := t.TempDir()
		dst := filepath.Join(base, "lib", "modules", tree.Release())
		if err := os.MkdirAll(dst, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(k.Modules, "kernel"), filepath.Join(dst, "kernel")); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"modules.builtin", "modules.builtin.modinfo", "modules.order"} {
			b, err := os.ReadFile(filepath.Join(k.Modules, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dst, f), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		run(t, "depmod", "-b", base, tree.Release())
		dtree, err := Open(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !dtree.HasModulesDep() {
			t.Fatal("modules.dep not used")
		}
		for _, set := range [][]string{wantSet, {"virtio_scsi", "sd_mod", "nvme", "xfs", "btrfs", "dm_crypt"}} {
			want, err := dtree.Closure(set)
			if err != nil {
				t.Fatal(err)
			}
			got, err := tree.Closure(set)
			if err != nil {
				t.Fatal(err)
			}
			if g, w := canonical(got), canonical(want); !reflect.DeepEqual(g, w) {
				t.Errorf("closure of %v without modules.dep\n got %v\nwant %v (with modules.dep)", set, g, w)
			}
			pos := map[string]int{}
			for i, m := range got {
				pos[m.Name] = i
			}
			for _, m := range got {
				for _, d := range m.Deps {
					if pos[d] >= pos[m.Name] {
						t.Errorf("%s loads before its dependency %s", m.Name, d)
					}
				}
			}
		}
	})
}

// TestAliasScanMatchesModinfo: the prefix scan of compressed modules
// (scanAliasesXZ) finds exactly the aliases of the whole .modinfo section,
// on a sample of Debian 13's .ko.xz tree, with one set of buffers reused
// from module to module as the tree-wide scan does.
func TestAliasScanMatchesModinfo(t *testing.T) {
	k := kernelcache.ForTestNamed(t, kernelcache.Debian13)
	tree, err := Open(k.Modules)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	var sb scanBuffers
	for i, n := range sortedNames(tree.files) {
		p := filepath.Join(k.Modules, tree.files[n])
		if i%5 != 0 || !strings.HasSuffix(p, ".ko.xz") {
			continue
		}
		got, ok, err := scanAliasesXZ(p, n, &sb)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			continue
		}
		found++
		mi, err := readModinfoFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, mi.aliases) {
			t.Errorf("%s: scan found aliases %q, .modinfo has %q", n, got, mi.aliases)
		}
	}
	if found < 100 {
		t.Errorf("the scan found .modinfo in only %d modules: it is not being tested", found)
	}
}

// canonical sorts a closure and each module's deps by name.
func canonical(ms []Module) []Module {
	out := make([]Module, len(ms))
	for i, m := range ms {
		m.Deps = slices.Sorted(slices.Values(m.Deps))
		out[i] = m
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// TestAliasCache: a second build on the same tree reads the alias scan
// from the user cache, with the same closure; a tree that changed is
// scanned again.
func TestAliasCache(t *testing.T) {
	k := kernelcache.ForTestNamed(t, kernelcache.Debian13)
	cacheHome := t.TempDir()
	t.Setenv("XDG_CACHE_HOME", cacheHome)
	set := []string{"ext4", "dm_crypt"} // ext4's softdep is an alias
	closure := func(dir string) []Module {
		tree, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tree.Closure(set)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	files := func() []string {
		m, _ := filepath.Glob(filepath.Join(cacheHome, "unlockrd", "kmod-aliases", "*.json"))
		return m
	}
	first := closure(k.Modules)
	if n := len(files()); n != 1 {
		t.Fatalf("%d alias cache files after a scan, want 1", n)
	}
	if second := closure(k.Modules); !reflect.DeepEqual(first, second) {
		t.Errorf("closure from the cache\n got %v\nwant %v", second, first)
	}
	if n := len(files()); n != 1 {
		t.Errorf("%d alias cache files after a cached build, want still 1", n)
	}
	// A damaged cache file is scanned over.
	if err := os.WriteFile(files()[0], []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if again := closure(k.Modules); !reflect.DeepEqual(first, again) {
		t.Errorf("closure with a damaged cache\n got %v\nwant %v", again, first)
	}
	// A changed tree (a module file newer) gets its own scan.
	base := t.TempDir()
	dst := filepath.Join(base, "modules")
	run(t, "cp", "-a", k.Modules, dst)
	p := filepath.Join(dst, "kernel", "crypto", "xts.ko.xz")
	if err := os.Chtimes(p, time.Now(), time.Now()); err != nil {
		t.Fatal(err)
	}
	closure(dst)
	if n := len(files()); n != 2 {
		t.Errorf("%d alias cache files after a build on a changed tree, want 2", n)
	}
}

// TestPrefixDecoderMatchesXZ: the alias scan's own LZMA2 decoder
// (prefixDecoder) decodes modules of Debian 13's .ko.xz tree, whole, to
// exactly what github.com/ulikunitz/xz (which checks the CRC) gives, and
// stops where it is asked to, on every 11th module and all of the largest
// (which xz wrote in several blocks).
func TestPrefixDecoderMatchesXZ(t *testing.T) {
	k := kernelcache.ForTestNamed(t, kernelcache.Debian13)
	tree, err := Open(k.Modules)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for i, n := range sortedNames(tree.files) {
		p := filepath.Join(k.Modules, tree.files[n])
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(p, ".ko.xz") || i%11 != 0 && st.Size() < 1<<20 {
			continue
		}
		want, err := readFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		d := newPrefixDecoder(b)
		if d == nil {
			t.Fatalf("%s: not .xz with LZMA2 blocks", p)
		}
		if err := d.fill(len(want) / 3); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if len(d.out) < len(want)/3 || len(d.out) >= len(want) && len(want) > 64<<10 {
			t.Errorf("%s: asked for %d bytes of %d, decoded %d", p, len(want)/3, len(want), len(d.out))
		}
		if err := d.fill(1 << 30); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if !d.done || !bytes.Equal(d.out, want) {
			t.Fatalf("%s: decoded %d bytes (end %v), differing from xz's %d", p, len(d.out), d.done, len(want))
		}
		checked++
	}
	if checked < 350 {
		t.Errorf("only %d modules checked", checked)
	}
}
