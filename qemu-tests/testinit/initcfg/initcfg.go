// Package initcfg is the configuration of the test init (qemu-tests/testinit),
// shared by the init and by the harness that writes it into test disks, so
// the two can't drift apart.
package initcfg

import (
	"strings"
	"unicode/utf8"
)

// Path is where the test init reads its configuration inside the root it
// boots from.
const Path = "/etc/testinit.json"

// Prefix starts every line the test init prints, so tests can tell its
// report from kernel and initramfs output on the same console.
const Prefix = "TESTINIT: "

// Config tells the test init what to report and, for harness self-tests
// that boot it directly from an initramfs, what to set up first. A boot
// test of the real image only needs Files: unlockrd has done the rest.
type Config struct {
	// Files are read and reported (sha256 and first line), in order.
	Files []string `json:"files,omitempty"`

	// Modules are kernel module files loaded in this order before
	// anything else; modules already present are not an error.
	Modules []string `json:"modules,omitempty"`
	// Wait lists paths (usually block devices) to wait for after
	// loading the modules, because device probing is asynchronous.
	Wait []string `json:"wait,omitempty"`
	// WaitSeconds bounds Wait; 0 means 60 seconds.
	WaitSeconds int `json:"wait_seconds,omitempty"`
	// Crypt mappings are created with raw device-mapper ioctls, without
	// LUKS: they let the harness check its own encrypted partitions
	// against the kernel's dm-crypt.
	Crypt []Crypt `json:"crypt,omitempty"`
	// Mounts are mounted in order, after Crypt.
	Mounts []Mount `json:"mounts,omitempty"`
}

// Crypt is one dm-crypt mapping, created as /dev/mapper/<Name>.
type Crypt struct {
	Name   string `json:"name"`
	Device string `json:"device"`
	// Cipher defaults to aes-xts-plain64.
	Cipher string `json:"cipher,omitempty"`
	// Key is the volume key in hex.
	Key string `json:"key"`
	// Offset is where the encrypted data starts on Device, in 512-byte
	// sectors (dm-crypt's unit, whatever SectorSize is).
	Offset uint64 `json:"offset"`
	// IVOffset is added to the IV sector number (LUKS2 iv_tweak).
	IVOffset uint64 `json:"iv_offset,omitempty"`
	// SectorSize is the encryption data unit; 0 means 512.
	SectorSize int `json:"sector_size,omitempty"`
	// Flags are dm-crypt optional parameters, e.g. no_read_workqueue.
	Flags []string `json:"flags,omitempty"`
}

// Mount is one mount(2) call; Target is created if missing.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	FSType   string `json:"fstype"`
	ReadOnly bool   `json:"ro,omitempty"`
	// Data is the file-system specific option string.
	Data string `json:"data,omitempty"`
}

// maxContent bounds the first line printed for a file.
const maxContent = 200

// FirstLine is how the test init shows a file's content: its first line,
// at most 200 bytes, control characters as '?', or "<binary>" when it
// holds a NUL byte. Tests use it to predict the line.
func FirstLine(b []byte) string {
	s := string(b)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > maxContent {
		s = s[:maxContent]
	}
	if strings.IndexByte(s, 0) >= 0 {
		return "<binary>"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			return '?'
		}
		return r
	}, s)
}
