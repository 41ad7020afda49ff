//go:build !cgo

package pkcs11key

import "errors"

// Available says whether this build can talk to PKCS#11 modules.
const Available = false

// MasterKey always fails: this binary was built without cgo.
func MasterKey(u *URI, create bool) ([]byte, bool, error) {
	return nil, false, errors.New("pkcs11: this build has no PKCS#11 support (built with CGO_ENABLED=0); build unlockrd-keyserver with cgo, as `make build` does")
}
