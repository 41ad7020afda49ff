// Package kmod computes the set of kernel modules an image must carry, and
// the order to load them in, from a kernel's module tree
// (/lib/modules/<release>).
//
// The image has no modprobe: nothing at boot resolves a dependency, an alias
// or a soft dependency, and the kernel's own request_module calls fail. So
// everything modprobe would have done is decided here, at build time, and
// written down as a plain ordered list. The order has to be exact: a module
// loaded before one it needs fails with a misleading ENOENT rather than a
// message naming the missing symbol's module.
//
// Dependencies come from modules.dep (and modules.softdep, modules.alias)
// when depmod has been run on the tree, and otherwise from each module's own
// .modinfo ELF section, which is where depmod gets them from: a kernel
// package extracted from a .deb or an RPM has no modules.dep, because its
// post-install script would have made one.
//
// It runs on the build host only.
package kmod

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
)

// ErrNotModuleTree is returned by Open for a folder that is not a module tree.
var ErrNotModuleTree = errors.New("not a module tree")

// ErrNotFound is wrapped by every error about a module that is neither a
// file in the tree nor built into the kernel.
var ErrNotFound = errors.New("not found")

// Module is one module the image carries, in load order.
type Module struct {
	// Name is the module's name with dashes turned into underscores, the
	// form the kernel uses in /proc/modules.
	Name string
	// Path is the module's file relative to the tree, possibly compressed
	// (kernel/fs/ext4/ext4.ko, kernel/crypto/xts.ko.zst).
	Path string
	// Deps names every module of the closure that must be loaded before
	// this one, transitively and in load order: its hard dependencies, the
	// providers of its "pre" soft dependencies, the modules it implies
	// (see Closure) and the modules whose "post" soft dependency it is.
	// A loader that starts modules concurrently can wait for exactly these.
	Deps []string
	// Optional is set when no requested module needs this one through hard
	// dependencies: it is only a soft dependency, an alias provider or a
	// CPU-specific acceleration, and may fail to load (crc32c_intel on a CPU
	// without SSE4.2) without stopping the boot.
	Optional bool
}

// Tree is an opened module tree. Its methods are safe for concurrent use.
type Tree struct {
	dir     string
	release string
	machine elf.Machine
	log     ulog.Logger

	// files maps every module name to its path relative to dir.
	files map[string]string
	// builtin holds the names of modules compiled into the kernel.
	builtin map[string]bool
	// builtinAliases are the aliases of built-in modules
	// (modules.builtin.modinfo): a soft dependency they satisfy needs no
	// file.
	builtinAliases *aliasIndex

	// hasDep is set when modules.dep exists; depLists then holds it.
	hasDep   bool
	depLists map[string][]string
	// softdeps is modules.softdep when depmod wrote one.
	softdeps map[string]softdep

	mu      sync.Mutex
	infos   map[string]*modinfo
	aliases *aliasIndex // built on first need
	// aliasesFromFile is set when aliases came from modules.alias.
	aliasesFromFile bool
	// pending holds notes made by Open, before a logger could be set.
	pending []string
}

// Open reads the index files of the module tree at dir. It reads no module
// except one, to learn the release the modules were built for.
func Open(dir string) (*Tree, error) {
	st, err := os.Stat(filepath.Join(dir, "kernel"))
	if err != nil || !st.IsDir() {
		return nil, fmt.Errorf("%s: %w (no kernel/ folder: want /lib/modules/<release>)", dir, ErrNotModuleTree)
	}
	t := &Tree{
		dir:     dir,
		infos:   map[string]*modinfo{},
		builtin: map[string]bool{},
	}
	if err := t.readBuiltin(); err != nil {
		return nil, err
	}
	switch files, deps, err := readModulesDep(filepath.Join(dir, "modules.dep")); {
	case err == nil:
		t.hasDep = true
		t.files, t.depLists = files, deps
		t.softdeps, err = readModulesSoftdep(filepath.Join(dir, "modules.softdep"))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	case errors.Is(err, fs.ErrNotExist):
		if t.files, err = t.walk(); err != nil {
			return nil, err
		}
	default:
		return nil, err
	}
	if err := t.readRelease(); err != nil {
		return nil, err
	}
	return t, nil
}

// SetLogger sends the tree's notes to l, starting with those Open made
// before there was anywhere to send them.
func (t *Tree) SetLogger(l ulog.Logger) {
	if l == nil {
		l = ulog.Null
	}
	t.mu.Lock()
	t.log = l
	pending := t.pending
	t.pending = nil
	t.mu.Unlock()
	for _, p := range pending {
		l.Printf("%s", p)
	}
}

// note logs through the logger, or keeps the note for SetLogger.
func (t *Tree) note(format string, v ...any) {
	t.mu.Lock()
	l := t.log
	if l == nil {
		t.pending = append(t.pending, fmt.Sprintf(format, v...))
		l = nil
	}
	t.mu.Unlock()
	if l != nil {
		l.Printf(format, v...)
	}
}

// Dir returns the folder the tree was opened from.
func (t *Tree) Dir() string { return t.dir }

// Release returns the kernel release the modules were built for, taken
// from a module's vermagic rather than from the folder name: the kernel
// looks for /lib/modules/$(uname -r), and the folder given to the builder
// may have been renamed (a cache folder called "modules").
func (t *Tree) Release() string { return t.release }

// Machine returns the ELF machine of the modules, so that an init binary
// for another architecture can be refused at build time.
func (t *Tree) Machine() elf.Machine { return t.machine }

// HasModulesDep reports whether dependencies come from depmod's index
// files rather than from the modules themselves.
func (t *Tree) HasModulesDep() bool { return t.hasDep }

// ReadModule returns the module's file contents, decompressed.
func (t *Tree) ReadModule(m Module) ([]byte, error) {
	b, err := readFile(filepath.Join(t.dir, filepath.FromSlash(m.Path)))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", m.Name, err)
	}
	return b, nil
}

// Normalize returns the canonical form of a module name: the kernel treats
// "-" and "_" in module names as the same character.
func Normalize(name string) string {
	return strings.ReplaceAll(name, "-", "_")
}

// moduleSuffixes are the file endings of module files, in the order a
// file name is tried against them.
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// StripCompression turns the path of a compressed module into the path of
// the same module uncompressed (x.ko.xz → x.ko).
func StripCompression(p string) string {
	for _, s := range moduleSuffixes[1:] {
		if strings.HasSuffix(p, s) {
			return strings.TrimSuffix(p, s) + ".ko"
		}
	}
	return p
}

// nameOf returns the module name of a module file path, or "" when the
// path is not a module file.
func nameOf(p string) string {
	base := path.Base(filepath.ToSlash(p))
	for _, s := range moduleSuffixes {
		if strings.HasSuffix(base, s) {
			return Normalize(strings.TrimSuffix(base, s))
		}
	}
	return ""
}

// walk indexes every module file of the tree when there is no
// modules.dep.
func (t *Tree) walk() (map[string]string, error) {
	files := map[string]string{}
	// WalkDir does not follow a symbolic link even at its root, and
	// /lib/modules/<release> is one on some systems.
	root, err := filepath.EvalSymlinks(t.dir)
	if err != nil {
		return nil, fmt.Errorf("module tree %s: %w", t.dir, err)
	}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("module tree %s: %w", t.dir, err)
		}
		if d.IsDir() || !d.Type().IsRegular() {
			// build/ and source/ are symbolic links to kernel headers;
			// WalkDir does not follow them.
			return nil
		}
		name := nameOf(p)
		if name == "" {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if old, dup := files[name]; dup {
			keep := preferred(old, rel)
			t.note("module %s is both %s and %s: using %s", name, old, rel, keep)
			rel = keep
		}
		files[name] = rel
		return nil
	})
	return files, err
}

// preferred picks between two files of the same module the way depmod's
// default search order does: updates/ (where DKMS and vendors put
// replacements) over anything else, and anything else over kernel/.
func preferred(a, b string) string {
	rank := func(p string) int {
		switch {
		case strings.HasPrefix(p, "updates/"):
			return 0
		case strings.HasPrefix(p, "kernel/"):
			return 2
		}
		return 1
	}
	if ra, rb := rank(a), rank(b); ra != rb {
		if ra < rb {
			return a
		}
		return b
	}
	if a < b {
		return a
	}
	return b
}

// readRelease takes the release and machine from the first module in path
// order, so that the answer does not depend on map order.
func (t *Tree) readRelease() error {
	var first string
	for _, p := range t.files {
		if first == "" || p < first {
			first = p
		}
	}
	if first == "" {
		t.release = filepath.Base(filepath.Clean(t.dir))
		return nil
	}
	mi, err := t.modinfo(nameOf(first))
	if err != nil {
		return err
	}
	if f := strings.Fields(mi.vermagic); len(f) > 0 {
		t.release = f[0]
	} else {
		t.release = filepath.Base(filepath.Clean(t.dir))
	}
	t.machine = mi.machine
	return nil
}

// modinfo returns the cached .modinfo of a module of the tree.
func (t *Tree) modinfo(name string) (*modinfo, error) {
	t.mu.Lock()
	mi, ok := t.infos[name]
	t.mu.Unlock()
	if ok {
		return mi, nil
	}
	rel, ok := t.files[name]
	if !ok {
		return nil, fmt.Errorf("module %s: %w in %s", name, ErrNotFound, t.dir)
	}
	mi, err := readModinfoFile(filepath.Join(t.dir, filepath.FromSlash(rel)))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", name, err)
	}
	t.mu.Lock()
	t.infos[name] = mi
	t.mu.Unlock()
	return mi, nil
}

// sortedNames returns the keys of a set in order.
func sortedNames(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
