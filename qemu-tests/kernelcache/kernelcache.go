// Package kernelcache finds the stock Debian kernels that `make kernel`
// downloads and unpacks (qemu-tests/setup/fetch-kernel.sh), for every test
// and tool that needs a real kernel or module tree. It is test support: no
// binary that ships links it.
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

// ModulePath is the Go module whose root holds .cache/ and the sources the
// tests build.
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
	// Dir is the cache folder of this kernel.
	Dir string
	// Vmlinuz is the bzImage QEMU boots with -kernel.
	Vmlinuz string
	// Modules is the module tree, i.e. lib/modules/<Release>.
	Modules string
	// Release is the kernel release, e.g. 6.1.0-48-amd64.
	Release string
}

// Find locates the cached kernel under <module root>/.cache/kernel.
func Find() (Files, error) {
	root, err := ModuleRoot()
	if err != nil {
		return Files{}, err
	}
	dir := filepath.Join(root, ".cache", "kernel")
	k := Files{
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
			return Files{}, fmt.Errorf("kernelcache: kernel not cached (%w): run `make kernel` in %s", err, root)
		}
	}
	if k.Release == "" {
		return Files{}, fmt.Errorf("kernelcache: %s missing: run `make kernel` in %s", filepath.Join(dir, "release"), root)
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
	k, err := Find()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
