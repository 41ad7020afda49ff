package mkcli

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestKeyFileWiped holds the buffer the key file was read into and checks
// it is zero once the check is done, after a success and after a failure.
func TestKeyFileWiped(t *testing.T) {
	kf := filepath.Join(t.TempDir(), "key")
	secret := []byte("the key server's key for this host")
	if err := os.WriteFile(kf, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, fail := range []error{nil, errors.New("refused")} {
		var held []byte
		err := withKeyFile(kf, nil, func(key []byte) error {
			if !bytes.Equal(key, secret) {
				t.Errorf("key read as %q", key)
			}
			held = key
			return fail
		})
		if !errors.Is(err, fail) {
			t.Errorf("withKeyFile returned %v, want %v", err, fail)
		}
		if len(held) != len(secret) || !bytes.Equal(held, make([]byte, len(secret))) {
			t.Errorf("fn error %v: key buffer not wiped: %q", fail, held)
		}
	}
}
