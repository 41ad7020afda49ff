// Package dm creates and removes dm-crypt mappings with device-mapper
// ioctls of its own.
package dm

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/sys/unix"
)

// Device-mapper ioctls by hand: libraries format the key into a Go string
// (which cannot be wiped); here every buffer that holds it is cleared once
// the kernel has copied it, and the load carries DM_SECURE_DATA_FLAG so the
// kernel wipes its own copy of the ioctl buffer too.

// CryptTable is one dm-crypt mapping.
type CryptTable struct {
	Name string
	// UUID is the dm uuid (CRYPT-LUKS2-<uuid>-<name>, as cryptsetup
	// names it, so tools recognise the mapping).
	UUID       string
	Cipher     string
	Key        *secret.Buf // not owned: the caller wipes it
	IVOffset   uint64      // in 512-byte sectors
	Device     string      // backing block device
	Offset     int64       // bytes
	Length     int64       // bytes
	SectorSize int
	// Flags are kernel option names: allow_discards, no_read_workqueue,
	// no_write_workqueue.
	Flags []string
}

// paramsLen bounds the length of the rendered parameters.
func (t CryptTable) paramsLen() int {
	n := len(t.Cipher) + 2*t.Key.Len() + 128
	for _, o := range t.options() {
		n += len(o) + 1
	}
	return n
}

func (t CryptTable) options() []string {
	opts := append([]string(nil), t.Flags...)
	if t.SectorSize != 0 && t.SectorSize != 512 {
		opts = append(opts, "sector_size:"+strconv.Itoa(t.SectorSize))
	}
	return opts
}

// appendParams renders the crypt target parameters (the key in hex) into
// b. b must have paramsLen() spare capacity: a growing buffer would leave
// copies of the key in the arrays it outgrew.
func (t CryptTable) appendParams(b []byte, devNum string) []byte {
	opts := t.options()
	b = append(b, t.Cipher...)
	b = append(b, ' ')
	b = hex.AppendEncode(b, t.Key.Bytes())
	b = fmt.Appendf(b, " %d %s %d", t.IVOffset, devNum, t.Offset/512)
	if len(opts) > 0 {
		b = fmt.Appendf(b, " %d", len(opts))
		for _, o := range opts {
			b = append(b, ' ')
			b = append(b, o...)
		}
	}
	return b
}

// params renders the parameters into a fresh buffer the caller must
// clear (it holds the key in hex).
func (t CryptTable) params(devNum string) []byte {
	return t.appendParams(make([]byte, 0, t.paramsLen()+len(devNum)), devNum)
}

// Describe is the table line with the key hidden, for logs and errors.
func (t CryptTable) Describe() string {
	devNum, err := devNumber(t.Device)
	if err != nil {
		devNum = t.Device
	}
	return t.describe(devNum)
}

func (t CryptTable) describe(devNum string) string {
	hidden := t
	hidden.Key = nil
	p := hidden.params(devNum)
	return fmt.Sprintf("0 %d crypt %s", t.Length/512, bytes.Replace(p, []byte(t.Cipher+"  "), []byte(t.Cipher+" <key> "), 1))
}

// devNumber returns "major:minor" of a block device.
func devNumber(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return "", fmt.Errorf("%s is not a block device", path)
	}
	return fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)), nil
}

// ioctlFunc sends one device-mapper request in buf (struct dm_ioctl and
// its payload), which the kernel also writes its reply into.
type ioctlFunc func(req uint, buf []byte) error

// Create creates, loads and resumes the mapping. On failure the
// half-made device is removed.
func Create(t CryptTable) error {
	devNum, err := devNumber(t.Device)
	if err != nil {
		return fmt.Errorf("dm %s: %w", t.Name, err)
	}
	return create(t, devNum, controlIoctl)
}

// create builds the table load in a single buffer, the ioctl buffer
// itself (so the key in hex exists in exactly one place, wiped right after
// the kernel has copied it), and sends it with DM_SECURE_DATA_FLAG so the
// kernel wipes its own copy too.
func create(t CryptTable, devNum string, ioctl ioctlFunc) error {
	if t.Length <= 0 || t.Length%512 != 0 || t.Offset%512 != 0 {
		return fmt.Errorf("dm %s: %d bytes at %d is not whole sectors", t.Name, t.Length, t.Offset)
	}
	if err := send(ioctl, unix.DM_DEV_CREATE, t.Name, t.UUID, 0, 0, 0, nil); err != nil {
		return fmt.Errorf("dm %s: create: %w", t.Name, err)
	}
	plen := t.paramsLen() + len(devNum)
	err := send(ioctl, unix.DM_TABLE_LOAD, t.Name, "", unix.DM_SECURE_DATA_FLAG, 1, targetSpecLen(plen), func(b []byte) error {
		return putTargetSpec(b, 0, uint64(t.Length/512), "crypt", func(p []byte) []byte { return t.appendParams(p, devNum) })
	})
	if err == nil {
		// DM_DEV_SUSPEND without the suspend flag resumes: the loaded
		// table becomes live.
		err = send(ioctl, unix.DM_DEV_SUSPEND, t.Name, "", 0, 0, 0, nil)
	}
	if err != nil {
		rerr := send(ioctl, unix.DM_DEV_REMOVE, t.Name, "", 0, 0, 0, nil)
		return errors.Join(fmt.Errorf("dm %s: load %s: %w", t.Name, t.describe(devNum), err), rerr)
	}
	return nil
}

// Remove removes a mapping (used when a later step fails).
func Remove(name string) error {
	return send(controlIoctl, unix.DM_DEV_REMOVE, name, "", 0, 0, 0, nil)
}

// targetSpecLen is the size of one struct dm_target_spec with up to plen
// bytes of parameters, NUL-terminated and 8-byte padded.
func targetSpecLen(plen int) int { return 40 + (plen+1+7)/8*8 }

// putTargetSpec encodes one struct dm_target_spec into b, its parameters
// rendered in place by params (which appends to the slice it is given,
// within its capacity).
func putTargetSpec(b []byte, start, length uint64, kind string, params func([]byte) []byte) error {
	binary.LittleEndian.PutUint64(b[0:], start)
	binary.LittleEndian.PutUint64(b[8:], length)
	binary.LittleEndian.PutUint32(b[16:], 0) // status
	copy(b[24:24+15], kind)
	room := b[40 : 40 : len(b)-1] // keep the terminating NUL
	p := params(room)
	if len(p) > 0 && &p[0] != &b[40] {
		clear(p) // outgrew its room and was copied: never happens with paramsLen
		return fmt.Errorf("target parameters longer than their buffer")
	}
	next := 40 + (len(p)+1+7)/8*8
	binary.LittleEndian.PutUint32(b[20:], uint32(next))
	return nil
}

// send makes one request: struct dm_ioctl followed by payloadLen bytes
// that fill writes in place. The buffer is cleared before send returns.
func send(ioctl ioctlFunc, req uint, name, uuid string, flags uint32, targets uint32, payloadLen int, fill func([]byte) error) error {
	var h unix.DmIoctl
	if len(name) >= len(h.Name) || len(uuid) >= len(h.Uuid) {
		return fmt.Errorf("name or uuid too long")
	}
	size := max(unix.SizeofDmIoctl+payloadLen, 16<<10) // room for the kernel's reply
	h.Version = [3]uint32{unix.DM_VERSION_MAJOR, 0, 0}
	h.Data_size = uint32(size)
	h.Data_start = unix.SizeofDmIoctl
	h.Target_count = targets
	h.Flags = flags
	copy(h.Name[:], name)
	copy(h.Uuid[:], uuid)
	buf := make([]byte, size)
	defer clear(buf)
	copy(buf, (*[unix.SizeofDmIoctl]byte)(unsafe.Pointer(&h))[:])
	if fill != nil {
		if err := fill(buf[unix.SizeofDmIoctl : unix.SizeofDmIoctl+payloadLen]); err != nil {
			return err
		}
	}
	return ioctl(req, buf)
}

// controlIoctl sends buf to /dev/mapper/control.
func controlIoctl(req uint, buf []byte) error {
	f, err := os.OpenFile("/dev/mapper/control", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return errno
	}
	return nil
}
