package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// ModulePath is the Go module whose root holds .cache/kernel and the test
// init's source.
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
	return "", fmt.Errorf("harness: no go.mod of %s above the working directory: run from inside the unlockrd checkout", ModulePath)
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

// KernelFiles is the cached Debian kernel that `make kernel` fetches.
type KernelFiles struct {
	// Vmlinuz is the bzImage QEMU boots with -kernel.
	Vmlinuz string
	// Modules is the module tree, i.e. lib/modules/<Release>.
	Modules string
	// Release is the kernel release, e.g. 6.1.0-48-amd64.
	Release string
}

// Kernel locates the cached kernel under <module root>/.cache/kernel.
func Kernel() (KernelFiles, error) {
	root, err := ModuleRoot()
	if err != nil {
		return KernelFiles{}, err
	}
	dir := filepath.Join(root, ".cache", "kernel")
	k := KernelFiles{
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
		Modules: filepath.Join(dir, "modules"),
	}
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err == nil {
		k.Release = strings.TrimSpace(string(rel))
	}
	for _, p := range []string{k.Vmlinuz, filepath.Join(k.Modules, "kernel")} {
		if _, err := os.Stat(p); err != nil {
			return KernelFiles{}, fmt.Errorf("harness: kernel not cached (%w): run `make kernel` in %s", err, root)
		}
	}
	if k.Release == "" {
		return KernelFiles{}, fmt.Errorf("harness: %s missing: run `make kernel` in %s", filepath.Join(dir, "release"), root)
	}
	return k, nil
}

var (
	testInitMu   sync.Mutex
	testInitPath string
)

// BuildTestInit compiles qemu-tests/testinit statically (once per process;
// the Go build cache makes it cheap) into <module root>/.cache/harness and
// returns the binary's path.
func BuildTestInit(ctx context.Context) (string, error) {
	testInitMu.Lock()
	defer testInitMu.Unlock()
	if testInitPath != "" {
		return testInitPath, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, ".cache", "harness")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("harness: test init cache: %w", err)
	}
	// Build to a private name and rename: test binaries of several
	// packages may build it at the same time.
	tmp, err := os.CreateTemp(dir, "testinit-*.tmp")
	if err != nil {
		return "", fmt.Errorf("harness: test init cache: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	if err := goBuildStatic(ctx, root, "./qemu-tests/testinit", tmp.Name()); err != nil {
		return "", err
	}
	out := filepath.Join(dir, "testinit")
	if err := os.Rename(tmp.Name(), out); err != nil {
		return "", fmt.Errorf("harness: install test init: %w", err)
	}
	testInitPath = out
	return out, nil
}

// goBuildStatic builds pkg (relative to the module root) the way an init
// must be: static, no cgo, stripped.
func goBuildStatic(ctx context.Context, root, pkg, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		var ee *exec.Error
		if errors.As(err, &ee) {
			return fmt.Errorf("harness: build %s: the go tool is needed: %w", pkg, err)
		}
		return fmt.Errorf("harness: build %s: %w\n%s", pkg, err, b)
	}
	return nil
}
