package image

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/u-root/mkuimage/cpio"

	"github.com/unlockrd/unlockrd/initramfs/layout"
)

// Entry is one record of an image.
type Entry struct {
	Name string
	Mode fs.FileMode
	// Size is the length of a regular file's contents.
	Size int64
	// Major and Minor are a device node's numbers.
	Major, Minor uint64
	MTime        time.Time
	UID, GID     uint64
	Ino          uint64
	// Data is a regular file's contents.
	Data []byte
}

// Contents is an image read back.
type Contents struct {
	Compression Compression
	Entries     []Entry
	// Config is the embedded configuration (layout.ConfigPath), nil if absent.
	Config []byte
	// Modules is the module load list (layout.ModulesPath).
	Modules []layout.Module
	// Release is the kernel release the modules are for (layout.ReleasePath).
	Release string
	// Uncompressed is the size of the cpio archive.
	Uncompressed int64
}

// File returns the contents of the regular file name (relative to the
// image root).
func (c *Contents) File(name string) ([]byte, bool) {
	for _, e := range c.Entries {
		if e.Name == name && e.Mode.IsRegular() {
			return e.Data, true
		}
	}
	return nil, false
}

// ReadFile reads the image at p.
func ReadFile(p string) (*Contents, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c, err := Read(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return c, nil
}

// Read decompresses an image (zstd, gzip or none, told apart by their
// magic numbers) and reads its records.
func Read(r io.Reader) (*Contents, error) {
	dr, comp, closeFn, err := decompressor(r)
	if err != nil {
		return nil, err
	}
	defer closeFn()
	raw, err := io.ReadAll(dr)
	if err != nil {
		return nil, fmt.Errorf("decompressing (%s): %w", comp, err)
	}
	c := &Contents{Compression: comp, Uncompressed: int64(len(raw))}
	err = cpio.ForEachRecord(cpio.Newc.Reader(bytes.NewReader(raw)), func(rec cpio.Record) error {
		e := Entry{
			Name:  rec.Name,
			Mode:  fileMode(rec.Mode),
			Major: rec.Rmajor,
			Minor: rec.Rminor,
			MTime: time.Unix(int64(rec.MTime), 0).UTC(),
			UID:   rec.UID,
			GID:   rec.GID,
			Ino:   rec.Ino,
		}
		if e.Mode.IsRegular() || e.Mode&fs.ModeSymlink != 0 {
			e.Size = int64(rec.FileSize)
			e.Data = make([]byte, rec.FileSize)
			if _, err := rec.ReadAt(e.Data, 0); err != nil && err != io.EOF {
				return fmt.Errorf("%s: %w", rec.Name, err)
			}
		}
		c.Entries = append(c.Entries, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cpio archive: %w", err)
	}
	if b, ok := c.File(layout.ConfigPath); ok {
		c.Config = b
	}
	if b, ok := c.File(layout.ReleasePath); ok {
		c.Release = layout.DecodeRelease(b)
	}
	if b, ok := c.File(layout.ModulesPath); ok {
		if c.Modules, err = layout.DecodeModules(b); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// fileMode converts a cpio mode (Unix st_mode) to an fs.FileMode.
func fileMode(m uint64) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	if m&cpio.S_ISUID != 0 {
		mode |= fs.ModeSetuid
	}
	if m&cpio.S_ISGID != 0 {
		mode |= fs.ModeSetgid
	}
	if m&cpio.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	switch m & cpio.S_IFMT {
	case cpio.S_IFDIR:
		mode |= fs.ModeDir
	case cpio.S_IFLNK:
		mode |= fs.ModeSymlink
	case cpio.S_IFCHR:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case cpio.S_IFBLK:
		mode |= fs.ModeDevice
	case cpio.S_IFIFO:
		mode |= fs.ModeNamedPipe
	case cpio.S_IFSOCK:
		mode |= fs.ModeSocket
	}
	return mode
}

// ModeString formats the mode as ls -l does ("crw-------", "drwxrwxrwt"):
// fs.FileMode's own String is Go's notation ("Dcrw-------").
func (e Entry) ModeString() string {
	m := e.Mode
	b := []byte("?rwxrwxrwx")
	switch {
	case m.IsDir():
		b[0] = 'd'
	case m&fs.ModeCharDevice != 0:
		b[0] = 'c'
	case m&fs.ModeDevice != 0:
		b[0] = 'b'
	case m&fs.ModeSymlink != 0:
		b[0] = 'l'
	case m&fs.ModeNamedPipe != 0:
		b[0] = 'p'
	case m&fs.ModeSocket != 0:
		b[0] = 's'
	default:
		b[0] = '-'
	}
	for i := 0; i < 9; i++ {
		if m&(1<<uint(8-i)) == 0 {
			b[i+1] = '-'
		}
	}
	special := func(i int, set bool, c byte) {
		if !set {
			return
		}
		if b[i] == '-' {
			c -= 'a' - 'A'
		}
		b[i] = c
	}
	special(3, m&fs.ModeSetuid != 0, 's')
	special(6, m&fs.ModeSetgid != 0, 's')
	special(9, m&fs.ModeSticky != 0, 't')
	return string(b)
}
