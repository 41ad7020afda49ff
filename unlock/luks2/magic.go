package luks2

import (
	"bytes"
	"encoding/binary"
	"slices"
)

// luksMagic starts a primary LUKS header, luksMagic2 a LUKS2 secondary one.
var (
	luksMagic  = []byte("LUKS\xba\xbe")
	luksMagic2 = []byte("SKUL\xba\xbe")
)

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// SecondaryOffsets are the offsets at which a LUKS2 secondary header may
// start: one per header size cryptsetup may write.
func SecondaryOffsets() []int64 { return slices.Clone(validHeaderSizes) }

// Signature is what the magic bytes of a LUKS header say, before any
// checksum is verified: enough to recognise a device, not to trust it.
type Signature struct {
	Version int // 1 or 2 (0: no LUKS magic found)
	// Secondary is set when only a LUKS2 secondary header was found: the
	// primary copy is damaged, and the volume may still open from the
	// secondary.
	Secondary bool
	UUID      string
	Label     string // LUKS2 only
}

// Sniff looks for a LUKS header at the start of head (a device's first
// bytes), then for a LUKS2 secondary header at every offset one may sit.
func Sniff(head []byte) Signature {
	if len(head) >= 512 && bytes.HasPrefix(head, luksMagic) {
		v := int(binary.BigEndian.Uint16(head[6:8]))
		s := Signature{Version: v, UUID: cstr(head[0xa8 : 0xa8+40])}
		if v == 2 {
			s.Label = cstr(head[0x18 : 0x18+48])
		}
		return s
	}
	for _, off := range validHeaderSizes {
		if int(off)+512 <= len(head) && bytes.HasPrefix(head[off:], luksMagic2) {
			h := head[off:]
			return Signature{Version: 2, Secondary: true, UUID: cstr(h[0xa8 : 0xa8+40]), Label: cstr(h[0x18 : 0x18+48])}
		}
	}
	return Signature{}
}
