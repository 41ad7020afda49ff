package mkcli

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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

// TestReasonsEvery: a refusal that carries several reasons (errors.Join,
// nested or not) prints each on its own line.
func TestReasonsEvery(t *testing.T) {
	err := errors.Join(
		errors.New("segment 0 cipher \"cipher_null\" is not on the allow-list"),
		errors.Join(errors.New("keyslot 3: 2^40 iterations"), errors.New("digest 0 names missing keyslot 7")),
	)
	got := reasons(fmt.Errorf("wrapped: %w", err))
	if len(got) != 3 || got[0] != "wrapped: segment 0 cipher \"cipher_null\" is not on the allow-list" {
		t.Errorf("reasons of a wrapped join: %q", got)
	}
	got = reasons(err)
	want := []string{`segment 0 cipher "cipher_null" is not on the allow-list`, "keyslot 3: 2^40 iterations", "digest 0 names missing keyslot 7"}
	if !slices.Equal(got, want) {
		t.Errorf("reasons = %q, want %q", got, want)
	}
}
