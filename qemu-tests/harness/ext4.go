package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
)

// TestInitConfig is the test init's configuration (/etc/testinit.json).
type TestInitConfig = initcfg.Config

// TestInitPrefix starts every line the test init prints.
const TestInitPrefix = initcfg.Prefix

// Ext4 is an ext4 file system built with `mke2fs -d` from a staging
// directory: no mounting, no root.
type Ext4 struct {
	// Label is the file-system label (at most 16 bytes).
	Label string
	// UUID is the file-system UUID; empty derives a stable one.
	UUID string
	// Dirs are created (mode 0755), e.g. mount points.
	Dirs []string
	// Files are written after Dirs; parent directories are created.
	Files []File
	// TestInit, when set, installs the test init as /sbin/init with this
	// configuration at /etc/testinit.json.
	TestInit *TestInitConfig
	// Tree, when set, is a host directory that becomes the file system as
	// it is (mke2fs -d keeps owners, modes and links), e.g. a whole Debian
	// root. It excludes Dirs, Files and TestInit: stage into it instead.
	Tree string
}

// File is a file to put into an Ext4.
type File struct {
	// Path inside the file system (absolute).
	Path string
	// Data is the content; when nil, Source (a host file) is copied.
	Data   []byte
	Source string
	// Mode defaults to 0644 for Data and to the source's mode for Source.
	Mode fs.FileMode
}

// File returns the content of the file at path in e, if e holds it as Data.
func (e *Ext4) File(path string) ([]byte, bool) {
	for _, f := range e.Files {
		if f.Path == path && f.Data != nil {
			return f.Data, true
		}
	}
	return nil, false
}

// TestRoot returns a root file system whose init is the test init: it
// has the directories the initramfs moves its mounts to and the given
// mount points (which unlockrd requires to exist in the new root).
func TestRoot(label string, cfg TestInitConfig, mountPoints ...string) *Ext4 {
	return &Ext4{
		Label:    label,
		Dirs:     append([]string{"/dev", "/proc", "/sys", "/run", "/tmp"}, mountPoints...),
		TestInit: &cfg,
	}
}

// buildExt4 makes an ext4 image of exactly size bytes in out.
func buildExt4(ctx context.Context, work string, e *Ext4, seed string, size int64, out string) (*BuiltFS, error) {
	if len(e.Label) > 16 {
		return nil, fmt.Errorf("ext4 label %q longer than 16 bytes", e.Label)
	}
	fsys := &BuiltFS{Label: e.Label, UUID: e.UUID}
	if fsys.UUID == "" {
		fsys.UUID = strings.ToLower(deriveUUID("ext4", seed, e.Label))
	}
	stage := e.Tree
	if stage != "" {
		if len(e.Dirs) > 0 || len(e.Files) > 0 || e.TestInit != nil {
			return nil, fmt.Errorf("ext4 %q: Tree excludes Dirs, Files and TestInit", e.Label)
		}
	} else {
		var err error
		if stage, err = os.MkdirTemp(work, "stage-*"); err != nil {
			return nil, err
		}
		if err := stageExt4(ctx, e, stage); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(out, nil, 0o600); err != nil {
		return nil, err
	}
	if err := os.Truncate(out, size); err != nil {
		return nil, err
	}
	// 4 KiB blocks: mke2fs would pick 1 KiB for a small image, which a
	// dm-crypt device with 4096-byte sectors can't mount.
	args := []string{"-q", "-F", "-t", "ext4", "-b", "4096", "-d", stage, "-U", fsys.UUID, "-E", "root_owner=0:0"}
	if e.Label != "" {
		args = append(args, "-L", e.Label)
	}
	args = append(args, out)
	if err := run(ctx, "mke2fs", args...); err != nil {
		return nil, err
	}
	return fsys, nil
}

func stageExt4(ctx context.Context, e *Ext4, stage string) error {
	for _, d := range e.Dirs {
		if err := os.MkdirAll(inside(stage, d), 0o755); err != nil {
			return err
		}
	}
	files := append([]File(nil), e.Files...)
	if e.TestInit != nil {
		bin, err := BuildTestInit(ctx)
		if err != nil {
			return err
		}
		cfg, err := json.MarshalIndent(e.TestInit, "", "  ")
		if err != nil {
			return err
		}
		files = append(files,
			File{Path: "/sbin/init", Source: bin, Mode: 0o755},
			File{Path: initcfg.Path, Data: append(cfg, '\n')})
	}
	for _, f := range files {
		if err := stageFile(stage, f); err != nil {
			return fmt.Errorf("file %s: %w", f.Path, err)
		}
	}
	return nil
}

func stageFile(stage string, f File) error {
	dst := inside(stage, f.Path)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if f.Data != nil || f.Source == "" {
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
		}
		if err := os.WriteFile(dst, f.Data, mode); err != nil {
			return err
		}
		return os.Chmod(dst, mode)
	}
	src, err := os.Open(f.Source)
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	mode := f.Mode
	if mode == 0 {
		mode = st.Mode().Perm()
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, src); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, mode)
}

// inside maps an absolute path of the file system into the staging dir.
func inside(stage, p string) string {
	return filepath.Join(stage, filepath.Clean("/"+p))
}

// run runs a tool and puts its output into the error, since mke2fs and
// cryptsetup explain failures only there.
func run(ctx context.Context, name string, args ...string) error {
	_, err := output(ctx, name, args...)
	return err
}

func output(ctx context.Context, name string, args ...string) ([]byte, error) {
	path, err := lookTool(name)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, path, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// lookTool finds a tool in PATH or in the sbin directories a non-root
// PATH often lacks.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found: run `make deps` (qemu-tests/setup/install-deps.sh)", name)
}
