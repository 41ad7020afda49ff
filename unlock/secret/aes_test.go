package secret

import (
	"bytes"
	"crypto/aes"
	"reflect"
	"testing"
	"unsafe"

	"golang.org/x/crypto/xts"
)

// objectBytes is the memory of the object p points to.
func objectBytes(p any) []byte {
	rv := reflect.ValueOf(p)
	return unsafe.Slice((*byte)(rv.UnsafePointer()), rv.Type().Elem().Size())
}

// TestAESKeysWiped: after Wipe, the expanded keys of an XTS cipher's two
// AES blocks are zero. It fails if crypto/aes's block type grows pointers
// (Wipe then leaves it) or if Wipe does nothing.
func TestAESKeysWiped(t *testing.T) {
	key := bytes.Repeat([]byte{0xa5}, 64)
	var k AESKeys
	c, err := xts.NewCipher(k.New, key)
	if err != nil {
		t.Fatal(err)
	}
	sector := make([]byte, 512)
	c.Encrypt(sector, sector, 7)
	if len(k.blocks) != 2 {
		t.Fatalf("%d blocks made, want 2", len(k.blocks))
	}
	for i, b := range k.blocks {
		if bytes.Count(objectBytes(b), []byte{0}) == len(objectBytes(b)) {
			t.Fatalf("block %d is all zeros before Wipe: not its key schedule", i)
		}
	}
	blocks := k.blocks
	if !k.Wipe() {
		t.Fatalf("Wipe left a block (its type %T has pointers)", blocks[0])
	}
	for i, b := range blocks {
		if m := objectBytes(b); !bytes.Equal(m, make([]byte, len(m))) {
			t.Errorf("block %d (%T, %d bytes) not zeroed", i, b, len(m))
		}
	}
	if _, err := k.New(make([]byte, 5)); err == nil || len(k.blocks) != 0 {
		t.Errorf("bad key size: err %v, remembered %d", err, len(k.blocks))
	}
}

func TestWipeObjectRefusesPointers(t *testing.T) {
	type withPtr struct {
		n int
		p *int
	}
	if wipeObject(&withPtr{1, new(int)}) {
		t.Error("wiped an object holding a pointer")
	}
	if b, _ := aes.NewCipher(make([]byte, 16)); !wipeObject(b) {
		t.Errorf("crypto/aes block %T not wipeable", b)
	}
}
