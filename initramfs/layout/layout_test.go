package layout

import (
	"reflect"
	"strings"
	"testing"
)

func TestModulesRoundTrip(t *testing.T) {
	in := []Module{
		{Name: "virtio", Path: "lib/modules/6.1.0/kernel/virtio.ko"},
		{Name: "virtio_blk", Path: "lib/modules/6.1.0/kernel/virtio_blk.ko", Deps: []string{"virtio"}, Optional: true},
	}
	b, err := EncodeModules(in)
	if err != nil {
		t.Fatal(err)
	}
	// The field names are the image format: an older init reads them.
	for _, f := range []string{`"name": "virtio"`, `"path": "lib/modules/6.1.0/kernel/virtio.ko"`, `"deps": [`, `"optional": true`} {
		if !strings.Contains(string(b), f) {
			t.Errorf("encoded list lacks %s:\n%s", f, b)
		}
	}
	if !strings.HasSuffix(string(b), "]\n") {
		t.Errorf("encoded list does not end in a newline: %q", b)
	}
	out, err := DecodeModules(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
}

func TestEncodeEmptyList(t *testing.T) {
	b, err := EncodeModules(nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != "[]\n" {
		t.Errorf("empty list encodes as %q, want \"[]\\n\"", b)
	}
}

func TestDecodeModulesErrorNamesFile(t *testing.T) {
	_, err := DecodeModules([]byte(`{"name": "x"}`))
	if err == nil || !strings.Contains(err.Error(), ModulesPath) {
		t.Errorf("decoding an object: err %v, want an error naming %s", err, ModulesPath)
	}
}

func TestRelease(t *testing.T) {
	if got := DecodeRelease(EncodeRelease("6.1.0-28-amd64")); got != "6.1.0-28-amd64" {
		t.Errorf("release round trip: %q", got)
	}
}
