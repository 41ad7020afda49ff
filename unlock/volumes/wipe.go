package volumes

import (
	"reflect"
	"unsafe"

	"github.com/anatol/luks.go"
)

// volumeKey returns the unexported volume key of a luks.Volume.
//
// luks.go keeps the key private and never clears it; reaching in is the
// only way to wipe it once the mapping exists. The field name is checked at
// run time so a changed luks.go fails loudly (nil) rather than silently.
func volumeKey(v *luks.Volume) []byte {
	f := reflect.ValueOf(v).Elem().FieldByName("key")
	if !f.IsValid() || f.Kind() != reflect.Slice || f.Type().Elem().Kind() != reflect.Uint8 {
		return nil
	}
	return *(*[]byte)(unsafe.Pointer(f.UnsafeAddr()))
}

// wipeVolumeKey zeroes the volume key held by v.
func wipeVolumeKey(v *luks.Volume) {
	clear(volumeKey(v))
}
