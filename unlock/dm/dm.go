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
	Key        []byte // not owned: the caller clears it
	IVOffset   uint64 // in 512-byte sectors
	Device     string // backing block device
	Offset     int64  // bytes
	Length     int64  // bytes
	SectorSize int
	// Flags are kernel option names: allow_discards, no_read_workqueue,
	// no_write_workqueue.
	Flags []string
}

// params renders the crypt target parameters into a fresh buffer the
// caller must clear (it holds the key in hex).
func (t CryptTable) params(devNum string) []byte {
	var opts []string
	opts = append(opts, t.Flags...)
	if t.SectorSize != 0 && t.SectorSize != 512 {
		opts = append(opts, "sector_size:"+strconv.Itoa(t.SectorSize))
	}
	// Size the buffer up front: a growing buffer would leave copies of
	// the key in the arrays it outgrew.
	n := len(t.Cipher) + 2*len(t.Key) + len(devNum) + 128
	for _, o := range opts {
		n += len(o) + 1
	}
	b := make([]byte, 0, n)
	b = append(b, t.Cipher...)
	b = append(b, ' ')
	b = hex.AppendEncode(b, t.Key)
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

// Create creates, loads and resumes the mapping. On failure the
// half-made device is removed.
func Create(t CryptTable) error {
	if t.Length <= 0 || t.Length%512 != 0 || t.Offset%512 != 0 {
		return fmt.Errorf("dm %s: %d bytes at %d is not whole sectors", t.Name, t.Length, t.Offset)
	}
	devNum, err := devNumber(t.Device)
	if err != nil {
		return fmt.Errorf("dm %s: %w", t.Name, err)
	}
	if _, err := dmIoctl(unix.DM_DEV_CREATE, t.Name, t.UUID, 0, 0, nil); err != nil {
		return fmt.Errorf("dm %s: create: %w", t.Name, err)
	}
	params := t.params(devNum)
	payload := targetSpec(0, uint64(t.Length/512), "crypt", params)
	clear(params)
	_, err = dmIoctl(unix.DM_TABLE_LOAD, t.Name, "", unix.DM_SECURE_DATA_FLAG, 1, payload)
	clear(payload)
	if err == nil {
		// DM_DEV_SUSPEND without the suspend flag resumes: the loaded
		// table becomes live.
		_, err = dmIoctl(unix.DM_DEV_SUSPEND, t.Name, "", 0, 0, nil)
	}
	if err != nil {
		_, rerr := dmIoctl(unix.DM_DEV_REMOVE, t.Name, "", 0, 0, nil)
		return errors.Join(fmt.Errorf("dm %s: load %s: %w", t.Name, t.describe(devNum), err), rerr)
	}
	return nil
}

// Remove removes a mapping (used when a later step fails).
func Remove(name string) error {
	_, err := dmIoctl(unix.DM_DEV_REMOVE, name, "", 0, 0, nil)
	return err
}

// targetSpec encodes one struct dm_target_spec followed by its
// NUL-terminated, 8-byte padded parameters.
func targetSpec(start, length uint64, kind string, params []byte) []byte {
	plen := (len(params) + 1 + 7) / 8 * 8
	b := make([]byte, 40+plen)
	binary.LittleEndian.PutUint64(b[0:], start)
	binary.LittleEndian.PutUint64(b[8:], length)
	binary.LittleEndian.PutUint32(b[16:], 0) // status
	binary.LittleEndian.PutUint32(b[20:], uint32(len(b)))
	copy(b[24:24+15], kind)
	copy(b[40:], params)
	return b
}

// dmIoctl sends one request to /dev/mapper/control. The buffer holding
// payload is cleared before returning.
func dmIoctl(req uint, name, uuid string, flags uint32, targets uint32, payload []byte) (unix.DmIoctl, error) {
	var h unix.DmIoctl
	if len(name) >= len(h.Name) || len(uuid) >= len(h.Uuid) {
		return h, fmt.Errorf("name or uuid too long")
	}
	size := unix.SizeofDmIoctl + len(payload)
	if size < 16<<10 {
		size = 16 << 10 // room for the kernel's reply
	}
	h.Version = [3]uint32{unix.DM_VERSION_MAJOR, 0, 0}
	h.Data_size = uint32(size)
	h.Data_start = unix.SizeofDmIoctl
	h.Target_count = targets
	h.Flags = flags
	copy(h.Name[:], name)
	copy(h.Uuid[:], uuid)
	buf := make([]byte, size)
	defer clear(buf)
	hb := (*[unix.SizeofDmIoctl]byte)(unsafe.Pointer(&h))
	copy(buf, hb[:])
	copy(buf[unix.SizeofDmIoctl:], payload)
	f, err := os.OpenFile("/dev/mapper/control", os.O_RDWR, 0)
	if err != nil {
		return h, err
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return h, errno
	}
	var out unix.DmIoctl
	copy((*[unix.SizeofDmIoctl]byte)(unsafe.Pointer(&out))[:], buf)
	return out, nil
}
