package dm

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"
	"unsafe"

	"github.com/unlockrd/unlockrd/unlock/secret"
	"golang.org/x/sys/unix"
)

func TestCryptTableParams(t *testing.T) {
	tb := CryptTable{Name: "data", Cipher: "aes-xts-plain64", Key: secret.From([]byte{0xde, 0xad}), IVOffset: 7,
		Offset: 4 << 20, Length: 20 << 20, SectorSize: 4096, Flags: []string{"no_read_workqueue", "no_write_workqueue"}}
	p := tb.params("254:2")
	if got, want := string(p), "aes-xts-plain64 dead 7 254:2 8192 3 no_read_workqueue no_write_workqueue sector_size:4096"; got != want {
		t.Fatalf("params = %q, want %q", got, want)
	}
	d := tb.describe("254:2")
	if strings.Contains(d, "dead") || !strings.Contains(d, "0 40960 crypt aes-xts-plain64 <key> 7 254:2 8192 3") {
		t.Fatalf("describe = %q", d)
	}
}

// TestTableLoadWipesKey holds every buffer the ioctls were given: the one
// that carried the table load must have held the key in hex (else this
// test could not fail) and must be all zero once Create returns, on
// success and on a failed load.
func TestTableLoadWipesKey(t *testing.T) {
	key := bytes.Repeat([]byte{0x5a, 0xc3, 0x17, 0x99}, 16)
	keyHex := []byte(hex.EncodeToString(key))
	for _, fail := range []bool{false, true} {
		var held [][]byte
		var reqs []uint
		ioctl := func(req uint, buf []byte) error {
			held = append(held, buf)
			reqs = append(reqs, req)
			if req == unix.DM_TABLE_LOAD {
				if !bytes.Contains(buf, keyHex) {
					t.Fatalf("table load does not carry the key")
				}
				var h unix.DmIoctl
				if f := binary.NativeEndian.Uint32(buf[unsafe.Offsetof(h.Flags):]); f&unix.DM_SECURE_DATA_FLAG == 0 {
					t.Errorf("table load without DM_SECURE_DATA_FLAG (flags %#x)", f)
				}
				if fail {
					return unix.EINVAL
				}
			}
			return nil
		}
		vk := secret.From(bytes.Clone(key))
		tb := CryptTable{Name: "data", Cipher: "aes-xts-plain64", Key: vk, Offset: 32 << 20, Length: 64 << 20, SectorSize: 4096}
		err := create(tb, "254:2", ioctl)
		if (err != nil) != fail {
			t.Fatalf("fail=%v: err = %v", fail, err)
		}
		if fail && (bytes.Contains([]byte(err.Error()), keyHex) || !strings.Contains(err.Error(), "<key>")) {
			t.Fatalf("error shows the key or no table: %v", err)
		}
		loads := 0
		for i, b := range held {
			if reqs[i] == unix.DM_TABLE_LOAD {
				loads++
			}
			if !bytes.Equal(b, make([]byte, len(b))) {
				t.Errorf("fail=%v: ioctl buffer %d (request %#x) not wiped", fail, i, reqs[i])
			}
		}
		if loads != 1 {
			t.Fatalf("%d table loads", loads)
		}
		// Create does not own the key: the caller wipes it.
		if !bytes.Equal(vk.Bytes(), key) {
			t.Fatal("Create changed the caller's key")
		}
		vk.Wipe()
	}
}
