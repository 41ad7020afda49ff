package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// ModulePath is the Go module whose root holds .cache/ and the test
// init's source.
const ModulePath = kernelcache.ModulePath

// ModuleRoot returns the directory of unlockrd's go.mod.
func ModuleRoot() (string, error) { return kernelcache.ModuleRoot() }

// KernelFiles is the cached Debian kernel that `make kernel` fetches.
type KernelFiles = kernelcache.Files

// Kernel locates the cached default kernel (kernelcache.Default).
func Kernel() (KernelFiles, error) { return kernelcache.Find() }

// KernelNamed locates the cached kernel called name (kernelcache.Names).
func KernelNamed(name string) (KernelFiles, error) { return kernelcache.FindNamed(name) }

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
