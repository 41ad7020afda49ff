package dm

import (
	"strings"
	"testing"
)

func TestCryptTableParams(t *testing.T) {
	tb := CryptTable{Name: "data", Cipher: "aes-xts-plain64", Key: []byte{0xde, 0xad}, IVOffset: 7,
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
