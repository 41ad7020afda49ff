package harness

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"unicode/utf16"
)

// GPT partition type GUIDs.
const (
	TypeLinuxFS   = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
	TypeLinuxSwap = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
)

const (
	sectorSize    = 512
	gptEntries    = 128
	gptEntrySize  = 128
	gptArrayBytes = gptEntries * gptEntrySize // 32 sectors
	gptNameUnits  = 36                        // UTF-16 code units in a name
	mib           = 1 << 20
)

// guidBytes converts a GUID's text form to the on-disk layout, where the
// first three fields are little-endian (the "mixed-endian" GPT encoding).
func guidBytes(s string) ([16]byte, error) {
	var g [16]byte
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 || strings.Count(s, "-") != 4 || len(s) != 36 {
		return g, fmt.Errorf("bad GUID %q", s)
	}
	b, err := hex.DecodeString(h)
	if err != nil {
		return g, fmt.Errorf("bad GUID %q: %w", s, err)
	}
	g[0], g[1], g[2], g[3] = b[3], b[2], b[1], b[0]
	g[4], g[5] = b[5], b[4]
	g[6], g[7] = b[7], b[6]
	copy(g[8:], b[8:])
	return g, nil
}

// deriveUUID makes a version-4-shaped UUID from a seed, so unnamed
// identifiers are stable from build to build and tests are reproducible.
func deriveUUID(parts ...string) string {
	sum := sha256.Sum256([]byte("unlockrd-harness\x00" + strings.Join(parts, "\x00")))
	b := sum[:16]
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return strings.ToUpper(h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32])
}

// gptEntry is one used partition entry.
type gptEntry struct {
	typeGUID, uniqueGUID string
	firstLBA, lastLBA    uint64 // inclusive
	name                 string
	attrs                uint64
}

// gptImage returns the sectors a GPT disk of diskBytes needs at its start
// (protective MBR, primary header, entry array) and at its end (entry
// array, backup header), following UEFI 2.10 §5.3.
func gptImage(diskBytes int64, diskGUID string, parts []gptEntry) (head, tail []byte, err error) {
	if diskBytes%sectorSize != 0 {
		return nil, nil, fmt.Errorf("disk size %d is not a multiple of %d", diskBytes, sectorSize)
	}
	sectors := uint64(diskBytes / sectorSize)
	arraySectors := uint64(gptArrayBytes / sectorSize)
	lastLBA := sectors - 1
	firstUsable := 2 + arraySectors
	lastUsable := lastLBA - arraySectors - 1
	if len(parts) > gptEntries {
		return nil, nil, fmt.Errorf("%d partitions, GPT holds %d", len(parts), gptEntries)
	}
	dg, err := guidBytes(diskGUID)
	if err != nil {
		return nil, nil, fmt.Errorf("disk GUID: %w", err)
	}

	array := make([]byte, gptArrayBytes)
	for i, p := range parts {
		if p.firstLBA < firstUsable || p.lastLBA > lastUsable || p.lastLBA < p.firstLBA {
			return nil, nil, fmt.Errorf("partition %q: LBAs %d-%d outside %d-%d", p.name, p.firstLBA, p.lastLBA, firstUsable, lastUsable)
		}
		e := array[i*gptEntrySize : (i+1)*gptEntrySize]
		tg, err := guidBytes(p.typeGUID)
		if err != nil {
			return nil, nil, fmt.Errorf("partition %q type: %w", p.name, err)
		}
		ug, err := guidBytes(p.uniqueGUID)
		if err != nil {
			return nil, nil, fmt.Errorf("partition %q PARTUUID: %w", p.name, err)
		}
		copy(e[0:16], tg[:])
		copy(e[16:32], ug[:])
		binary.LittleEndian.PutUint64(e[32:], p.firstLBA)
		binary.LittleEndian.PutUint64(e[40:], p.lastLBA)
		binary.LittleEndian.PutUint64(e[48:], p.attrs)
		name := utf16.Encode([]rune(p.name))
		if len(name) > gptNameUnits {
			return nil, nil, fmt.Errorf("partition name %q longer than %d UTF-16 units", p.name, gptNameUnits)
		}
		for j, u := range name {
			binary.LittleEndian.PutUint16(e[56+2*j:], u)
		}
	}
	arrayCRC := crc32.ChecksumIEEE(array)

	header := func(my, alternate, entriesLBA uint64) []byte {
		h := make([]byte, sectorSize)
		copy(h[0:8], "EFI PART")
		binary.LittleEndian.PutUint32(h[8:], 0x00010000)
		binary.LittleEndian.PutUint32(h[12:], 92)
		binary.LittleEndian.PutUint64(h[24:], my)
		binary.LittleEndian.PutUint64(h[32:], alternate)
		binary.LittleEndian.PutUint64(h[40:], firstUsable)
		binary.LittleEndian.PutUint64(h[48:], lastUsable)
		copy(h[56:72], dg[:])
		binary.LittleEndian.PutUint64(h[72:], entriesLBA)
		binary.LittleEndian.PutUint32(h[80:], gptEntries)
		binary.LittleEndian.PutUint32(h[84:], gptEntrySize)
		binary.LittleEndian.PutUint32(h[88:], arrayCRC)
		// The header CRC covers the 92 header bytes with its own field zero.
		binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h[:92]))
		return h
	}

	mbr := make([]byte, sectorSize)
	pe := mbr[446:462]
	pe[1], pe[2], pe[3] = 0x00, 0x02, 0x00 // CHS of LBA 1
	pe[4] = 0xEE
	pe[5], pe[6], pe[7] = 0xFF, 0xFF, 0xFF
	binary.LittleEndian.PutUint32(pe[8:], 1)
	binary.LittleEndian.PutUint32(pe[12:], uint32(min(sectors-1, 0xFFFFFFFF)))
	mbr[510], mbr[511] = 0x55, 0xAA

	head = append(append(mbr, header(1, lastLBA, 2)...), array...)
	tail = append(append([]byte(nil), array...), header(lastLBA, 1, lastLBA-arraySectors)...)
	return head, tail, nil
}

// writeGPT writes the partition table into a disk image of diskBytes.
func writeGPT(w io.WriterAt, diskBytes int64, diskGUID string, parts []gptEntry) error {
	head, tail, err := gptImage(diskBytes, diskGUID, parts)
	if err != nil {
		return err
	}
	if _, err := w.WriteAt(head, 0); err != nil {
		return err
	}
	_, err = w.WriteAt(tail, diskBytes-int64(len(tail)))
	return err
}
