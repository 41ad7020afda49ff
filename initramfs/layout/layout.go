// Package layout is the file layout of an unlockrd image: where the
// builder (initramfs/host/image) puts the configuration, the kernel release
// and the module load list, and the JSON form of that list. The init
// (initramfs/boot, initramfs/modload) reads the same files through it, so
// the two sides cannot drift apart.
//
// It is shared by host and boot code and imports neither.
package layout

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Paths inside the image, relative to its root (the kernel unpacks the
// image to "/", so at boot they are absolute paths under "/").
const (
	// InitPath is the unlockrd-init binary, run by the kernel as PID 1.
	InitPath = "init"
	// ConfigPath is the validated configuration, as JSON.
	ConfigPath = "etc/unlockrd/config.json"
	// ModulesPath is the module load list (EncodeModules).
	ModulesPath = "etc/unlockrd/modules.json"
	// ReleasePath holds the kernel release the modules are for, one line.
	ReleasePath = "etc/unlockrd/release"
	// ModulesRoot is the module tree: ModulesRoot/<release>/<path in the
	// kernel's module tree>.
	ModulesRoot = "lib/modules"
	// Mke2fsPath is mke2fs (Debian's, with the shared libraries it needs
	// at their own paths), carried only when a volume says provision.
	Mke2fsPath = "usr/sbin/mke2fs"
	// TestFaultsPath marks an image built for fault-injection tests
	// (mkunlockrd build --test-faults): only such an image honours
	// rd.unlockrd.test-poweroff-at=. Production images never carry it.
	TestFaultsPath = "etc/unlockrd/test-faults"
)

// Module is one entry of the load list, a JSON array in load order.
type Module struct {
	Name string `json:"name"`
	// Path is relative to the image root.
	Path string `json:"path"`
	// Deps are the modules that must be loaded first (all of them, not
	// only the direct ones).
	Deps []string `json:"deps"`
	// Optional modules (CPU-specific accelerations, soft dependencies)
	// may fail to load without failing the boot.
	Optional bool `json:"optional"`
}

// EncodeModules is the contents of ModulesPath for mods: indented, so that
// `mkunlockrd ls` and a reader of the unpacked image see one module a few
// lines, and newline-terminated.
func EncodeModules(mods []Module) ([]byte, error) {
	if mods == nil {
		mods = []Module{}
	}
	b, err := json.MarshalIndent(mods, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ModulesPath, err)
	}
	return append(b, '\n'), nil
}

// DecodeModules parses the contents of ModulesPath.
func DecodeModules(b []byte) ([]Module, error) {
	var mods []Module
	if err := json.Unmarshal(b, &mods); err != nil {
		return nil, fmt.Errorf("%s: %w", ModulesPath, err)
	}
	return mods, nil
}

// EncodeRelease is the contents of ReleasePath.
func EncodeRelease(release string) []byte { return []byte(release + "\n") }

// DecodeRelease parses the contents of ReleasePath.
func DecodeRelease(b []byte) string { return strings.TrimSpace(string(b)) }
