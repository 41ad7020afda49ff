//go:build !cgo

package pkcs11key

import (
	"strings"
	"testing"
)

// Without cgo a URI parses but opening it says why it can't work.
func TestMasterKeyWithoutCgo(t *testing.T) {
	u, err := Parse("pkcs11:token=a;object=b?module-path=/m&pin-value=1")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := MasterKey(u, true); err == nil || !strings.Contains(err.Error(), "built with CGO_ENABLED=0") {
		t.Fatalf("MasterKey without cgo: %v", err)
	}
}
