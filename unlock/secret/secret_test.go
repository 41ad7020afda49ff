package secret

import (
	"bytes"
	"fmt"
	"testing"
)

func TestWipeZeroesToCapacity(t *testing.T) {
	raw := []byte("passphrase-and-more")
	s := From(raw[:10])
	s.Wipe()
	if !bytes.Equal(raw, make([]byte, len(raw))) {
		t.Fatalf("after Wipe: %q", raw)
	}
	if s.Len() != 0 || s.Bytes() != nil {
		t.Fatal("Buf not empty after Wipe")
	}
	s.Wipe()
	var n *Buf
	n.Wipe()
}

func TestNeverPrinted(t *testing.T) {
	s := From([]byte("hunter2"))
	for _, verb := range []string{"%v", "%s", "%x", "%X", "%q", "%+v", "%#v", "%d"} {
		if out := fmt.Sprintf(verb, s); bytes.Contains([]byte(out), []byte("hunter2")) || bytes.Contains([]byte(out), []byte("68756e74")) {
			t.Errorf("%s prints the secret: %s", verb, out)
		}
	}
	if out := fmt.Sprint([]*Buf{s}); bytes.Contains([]byte(out), []byte("hunter2")) {
		t.Errorf("slice prints the secret: %s", out)
	}
}
