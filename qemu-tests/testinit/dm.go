package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
	"golang.org/x/sys/unix"
)

// Device-mapper ioctls by hand: there is no dmsetup in a test root, and
// the table (with its flags such as no_read_workqueue) is only visible
// through DM_TABLE_STATUS.

const (
	dmHeaderSize = unix.SizeofDmIoctl // struct dm_ioctl, 8-byte aligned
	dmSpecSize   = 40                 // struct dm_target_spec
)

// dmTarget is one line of a device-mapper table.
type dmTarget struct {
	start, length uint64
	kind, params  string
}

func dmHeader(name string, size int, flags uint32) unix.DmIoctl {
	h := unix.DmIoctl{
		Version:    [3]uint32{unix.DM_VERSION_MAJOR, 0, 0},
		Data_size:  uint32(size),
		Data_start: dmHeaderSize,
		Flags:      flags,
	}
	copy(h.Name[:unix.DM_NAME_LEN-1], name)
	return h
}

// dmIoctl runs one ioctl on /dev/mapper/control with buf (header first)
// and returns the header the kernel wrote back.
func dmIoctl(req uint, h unix.DmIoctl, payload []byte, size int) (unix.DmIoctl, []byte, error) {
	var b bytes.Buffer
	if err := binary.Write(&b, binary.LittleEndian, &h); err != nil {
		return h, nil, err
	}
	b.Write(payload)
	buf := make([]byte, max(size, b.Len()))
	copy(buf, b.Bytes())
	binary.LittleEndian.PutUint32(buf[12:], uint32(len(buf))) // data_size
	f, err := os.OpenFile("/dev/mapper/control", os.O_RDWR, 0)
	if err != nil {
		return h, nil, err
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return h, nil, errno
	}
	var out unix.DmIoctl
	if err := binary.Read(bytes.NewReader(buf[:dmHeaderSize]), binary.LittleEndian, &out); err != nil {
		return h, nil, err
	}
	return out, buf, nil
}

// dmTable returns the live table of a mapping, keys included: callers
// must hide them before printing.
func dmTable(name string) ([]dmTarget, error) {
	for size := 16 << 10; size <= 4<<20; size *= 4 {
		h, buf, err := dmIoctl(unix.DM_TABLE_STATUS, dmHeader(name, size, unix.DM_STATUS_TABLE_FLAG), nil, size)
		if err != nil {
			return nil, fmt.Errorf("DM_TABLE_STATUS %s: %w", name, err)
		}
		if h.Flags&unix.DM_BUFFER_FULL_FLAG != 0 {
			continue
		}
		return parseTargets(buf, h)
	}
	return nil, fmt.Errorf("DM_TABLE_STATUS %s: table larger than 4 MiB", name)
}

// parseTargets reads the target specs after the header; for a status
// reply each spec's next is relative to data_start, not to the spec.
func parseTargets(buf []byte, h unix.DmIoctl) ([]dmTarget, error) {
	var ts []dmTarget
	off := int(h.Data_start)
	for i := 0; i < int(h.Target_count); i++ {
		if off+dmSpecSize > len(buf) {
			return nil, fmt.Errorf("target %d outside the reply", i)
		}
		var s unix.DmTargetSpec
		if err := binary.Read(bytes.NewReader(buf[off:off+dmSpecSize]), binary.LittleEndian, &s); err != nil {
			return nil, err
		}
		params := buf[off+dmSpecSize:]
		if j := bytes.IndexByte(params, 0); j >= 0 {
			params = params[:j]
		}
		ts = append(ts, dmTarget{
			start:  s.Sector_start,
			length: s.Length,
			kind:   cstring(s.Target_type[:]),
			params: string(params),
		})
		off = int(h.Data_start) + int(s.Next)
	}
	return ts, nil
}

func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// cryptParams is the dm-crypt table line for c on a device of devSectors.
func cryptParams(c initcfg.Crypt) string {
	cipher := c.Cipher
	if cipher == "" {
		cipher = "aes-xts-plain64"
	}
	opts := append([]string(nil), c.Flags...)
	if c.SectorSize != 0 && c.SectorSize != 512 {
		opts = append(opts, fmt.Sprintf("sector_size:%d", c.SectorSize))
	}
	p := fmt.Sprintf("%s %s %d %s %d", cipher, c.Key, c.IVOffset, c.Device, c.Offset)
	if len(opts) > 0 {
		p += fmt.Sprintf(" %d %s", len(opts), strings.Join(opts, " "))
	}
	return p
}

// targetPayload encodes one target spec for DM_TABLE_LOAD.
func targetPayload(start, length uint64, kind, params string) []byte {
	p := append([]byte(params), 0)
	for len(p)%8 != 0 {
		p = append(p, 0)
	}
	s := unix.DmTargetSpec{Sector_start: start, Length: length, Next: uint32(dmSpecSize + len(p))}
	copy(s.Target_type[:len(s.Target_type)-1], kind)
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, &s)
	b.Write(p)
	return b.Bytes()
}

// dmCreateCrypt creates and activates a dm-crypt mapping covering the
// device from c.Offset to its end, and returns its device number.
func dmCreateCrypt(c initcfg.Crypt) (uint64, error) {
	size, err := blockSize(c.Device)
	if err != nil {
		return 0, err
	}
	if size/512 <= c.Offset {
		return 0, fmt.Errorf("%s: %d bytes, no room after offset %d", c.Device, size, c.Offset)
	}
	h, _, err := dmIoctl(unix.DM_DEV_CREATE, dmHeader(c.Name, dmHeaderSize, 0), nil, dmHeaderSize)
	if err != nil {
		return 0, fmt.Errorf("DM_DEV_CREATE %s: %w", c.Name, err)
	}
	dev := h.Dev
	payload := targetPayload(0, size/512-c.Offset, "crypt", cryptParams(c))
	lh := dmHeader(c.Name, 0, 0)
	lh.Target_count = 1
	if _, _, err := dmIoctl(unix.DM_TABLE_LOAD, lh, payload, 0); err != nil {
		return 0, fmt.Errorf("DM_TABLE_LOAD %s: %w", c.Name, err)
	}
	if _, _, err := dmIoctl(unix.DM_DEV_SUSPEND, dmHeader(c.Name, dmHeaderSize, 0), nil, dmHeaderSize); err != nil {
		return 0, fmt.Errorf("resume %s: %w", c.Name, err)
	}
	if err := mknodMapper(c.Name, dev); err != nil {
		return 0, fmt.Errorf("mknod /dev/mapper/%s: %w", c.Name, err)
	}
	return dev, nil
}

func blockSize(path string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var size uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64 %s: %w", path, errno)
	}
	return size, nil
}
