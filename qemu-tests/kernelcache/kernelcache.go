// Package kernelcache finds the stock Debian kernels that `make kernel`
// downloads and unpacks (qemu-tests/setup/fetch-kernel.sh), for every test
// and tool that needs a real kernel or module tree. It is test support: no
// binary that ships links it.
//
// The cache is machine-wide, ${UNLOCKRD_CACHE:-/var/cache/unlockrd}/kernels/
// NAME, not inside a checkout: a kernel package is ~100 MB to fetch and
// every clone, worktree and CI run on the machine reuses the same one.
package kernelcache

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// ModulePath is the Go module whose sources the tests build.
const ModulePath = "github.com/unlockrd/unlockrd"

var moduleRoot = sync.OnceValues(findModuleRoot)

// ModuleRoot returns the directory of unlockrd's go.mod. Tests run in
// their package directory and the demo from anywhere inside the checkout,
// so it walks up from the working directory and falls back to `go env
// GOMOD` (which also honours a go.work).
func ModuleRoot() (string, error) {
	return moduleRoot()
}

func findModuleRoot() (string, error) {
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; dir = filepath.Dir(dir) {
			if isModuleRoot(dir) {
				return dir, nil
			}
			if dir == filepath.Dir(dir) {
				break
			}
		}
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err == nil {
		if gomod := strings.TrimSpace(string(out)); gomod != "" && gomod != os.DevNull {
			if dir := filepath.Dir(gomod); isModuleRoot(dir) {
				return dir, nil
			}
		}
	}
	return "", fmt.Errorf("kernelcache: no go.mod of %s above the working directory: run from inside the unlockrd checkout", ModulePath)
}

func isModuleRoot(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if f := strings.Fields(s.Text()); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == ModulePath
		}
	}
	return false
}

// Files is one cached kernel.
type Files struct {
	// Name is the kernel's cache name (Debian12, Debian13).
	Name string
	// Dir is the cache folder of this kernel.
	Dir string
	// Vmlinuz is the bzImage QEMU boots with -kernel.
	Vmlinuz string
	// Modules is the module tree, i.e. lib/modules/<Release>.
	Modules string
	// Release is the kernel release, e.g. 6.1.0-48-amd64.
	Release string
}

// The kernels the suite boots, by cache folder name.
const (
	// Debian12 is bookworm's stock kernel (6.1, uncompressed modules).
	Debian12 = "debian12"
	// Debian13 is trixie's stock kernel (6.12, .ko.xz modules under
	// /usr/lib/modules, no modules.dep in the package).
	Debian13 = "debian13"
	// Default is the kernel of tests and tools that boot only one.
	Default = Debian12
)

// Names lists every kernel `make kernel` caches, in the order tests
// that run on each should run them.
func Names() []string { return []string{Debian12, Debian13} }

// CacheDir is the machine-wide kernel cache, $UNLOCKRD_CACHE/kernels
// (default /var/cache/unlockrd/kernels), the folder fetch-kernel.sh fills.
func CacheDir() string {
	return filepath.Join(CacheBase(), "kernels")
}

// CacheBase is the machine-wide cache of everything expensive the tests
// and the bench reuse across clones: $UNLOCKRD_CACHE, default
// /var/cache/unlockrd.
func CacheBase() string {
	if base := os.Getenv("UNLOCKRD_CACHE"); base != "" {
		return base
	}
	return "/var/cache/unlockrd"
}

// Find locates the cached Default kernel.
func Find() (Files, error) { return FindNamed(Default) }

// FindNamed locates the cached kernel called name (Debian12, Debian13).
func FindNamed(name string) (Files, error) {
	known := false
	for _, n := range Names() {
		known = known || n == name
	}
	if !known {
		return Files{}, fmt.Errorf("kernelcache: unknown kernel %q (have %s)", name, strings.Join(Names(), ", "))
	}
	dir := filepath.Join(CacheDir(), name)
	k := Files{
		Name:    name,
		Dir:     dir,
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
		Modules: filepath.Join(dir, "modules"),
	}
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err == nil {
		k.Release = strings.TrimSpace(string(rel))
	}
	for _, p := range []string{k.Vmlinuz, filepath.Join(k.Modules, "kernel")} {
		if _, err := os.Stat(p); err != nil {
			return Files{}, fmt.Errorf("kernelcache: kernel %s not cached (%w): run `make kernel`", name, err)
		}
	}
	if k.Release == "" {
		return Files{}, fmt.Errorf("kernelcache: %s missing: run `make kernel`", filepath.Join(dir, "release"))
	}
	return k, nil
}

// ForTest is Find for a test. Its absence fails the test (unless -short): a
// skipped kernel test is a silent one.
func ForTest(t testing.TB) Files {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: skipping tests that need the kernel cache")
	}
	return ForTestNamed(t, Default)
}

// ForTestNamed is FindNamed for a test, failing it (unless -short) when
// that kernel is not cached.
func ForTestNamed(t testing.TB, name string) Files {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: skipping tests that need the kernel cache")
	}
	k, err := FindNamed(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Each runs f in a subtest per cached kernel (t.Run(name, ...)), each
// failing (unless -short) when its kernel is missing: what differs between
// kernels is the builder's business, so the test body is the same.
func Each(t *testing.T, f func(t *testing.T, k Files)) {
	t.Helper()
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			f(t, ForTestNamed(t, name))
		})
	}
}
