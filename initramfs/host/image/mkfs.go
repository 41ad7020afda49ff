package image

import (
	"github.com/unlockrd/unlockrd/initramfs/layout"

	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// defaultMke2fs is where the build host's mke2fs is looked for (Debian,
// Ubuntu, Fedora: e2fsprogs).
var defaultMke2fs = []string{"/usr/sbin/mke2fs", "/sbin/mke2fs"}

// libDirs are searched for the shared libraries a program needs, in the
// dynamic loader's order for x86-64 Debian and Fedora.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// programFile is one file a dynamically linked program needs in the image:
// where it is on the build host and where it goes (relative path).
type programFile struct {
	host, image string
	mode        uint64
}

// mke2fsFiles finds the build host's mke2fs (or the one at path) and every
// shared library it needs, with its loader, to carry them into the image
// at their own absolute paths: the image then runs Debian's own mke2fs
// (the file system a provisioned volume gets is exactly the one Debian
// makes, no writer of our own) at a measured cost of 1.1 MB of xz image.
func mke2fsFiles(path string) ([]programFile, error) {
	if path == "" {
		for _, p := range defaultMke2fs {
			if _, err := os.Stat(p); err == nil {
				path = p
				break
			}
		}
		if path == "" {
			return nil, fmt.Errorf("a volume says provision, which needs mke2fs in the image: none at %s (Debian/Ubuntu: apt install e2fsprogs)", strings.Join(defaultMke2fs, " or "))
		}
	}
	out := []programFile{{host: path, image: layout.Mke2fsPath, mode: 0o755}}
	seen := map[string]bool{}
	queue := []string{path}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		f, err := elf.Open(p)
		if err != nil {
			return nil, fmt.Errorf("mke2fs: %s: %w", p, err)
		}
		needed, err := f.ImportedLibraries()
		var interp string
		for _, pr := range f.Progs {
			if pr.Type == elf.PT_INTERP {
				b := make([]byte, pr.Filesz)
				if _, err := pr.ReadAt(b, 0); err == nil {
					interp = strings.TrimRight(string(b), "\x00")
				}
			}
		}
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("mke2fs: %s: %w", p, err)
		}
		if interp != "" && !seen[interp] {
			seen[interp] = true
			// The loader knows itself by its soname: a NEEDED entry
			// naming it (libc's) needs no second copy.
			seen[filepath.Base(interp)] = true
			out = append(out, programFile{host: interp, image: strings.TrimPrefix(interp, "/"), mode: 0o755})
		}
		for _, lib := range needed {
			if seen[lib] {
				continue
			}
			seen[lib] = true
			found := ""
			for _, d := range libDirs {
				c := filepath.Join(d, lib)
				if _, err := os.Stat(c); err == nil {
					found = c
					break
				}
			}
			if found == "" {
				return nil, fmt.Errorf("mke2fs: library %s (needed by %s) not found in %s", lib, p, strings.Join(libDirs, ", "))
			}
			out = append(out, programFile{host: found, image: strings.TrimPrefix(found, "/"), mode: 0o755})
			queue = append(queue, found)
		}
	}
	return out, nil
}
