package qemutests

import (
	"os/exec"
	"strings"
	"testing"
)

const mod = "github.com/unlockrd/unlockrd/"

// bootOnly are the packages only PID 1 may link; hostOnly only the tools.
var (
	bootOnly = []string{"initramfs/boot", "initramfs/modload", "unlock/keys", "unlock/volumes", "unlock/dm", "unlock/sysroot"}
	hostOnly = []string{"initramfs/kmod", "initramfs/image", "unlock/keyserver", "qemu-tests/harness"}
)

func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", mod+pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

func hasPkg(list []string, p string) bool {
	for _, l := range list {
		if l == mod+p || strings.HasPrefix(l, mod+p+"/") {
			return true
		}
	}
	return false
}

// TestLayering enforces docs/ARCHITECTURE.md: host-side tools never link
// boot-only code and the init never links host-side code (which would also
// bloat an image that must stay small).
func TestLayering(t *testing.T) {
	for _, tool := range []string{"cmd/mkunlockrd", "cmd/unlockrd-keyserver"} {
		d := deps(t, tool)
		for _, b := range bootOnly {
			if hasPkg(d, b) {
				t.Errorf("%s links boot-only package %s", tool, b)
			}
		}
	}
	d := deps(t, "cmd/unlockrd-init")
	for _, h := range hostOnly {
		if hasPkg(d, h) {
			t.Errorf("unlockrd-init links host-only package %s", h)
		}
	}
	for _, heavy := range []string{"net/http"} {
		for _, l := range d {
			if l == heavy {
				t.Errorf("unlockrd-init links %s (the key fetch has its own small client)", heavy)
			}
		}
	}
}
