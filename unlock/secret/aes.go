package secret

import (
	"crypto/aes"
	"crypto/cipher"
	"reflect"
	"unsafe"
)

// AESKeys makes AES block ciphers and wipes their expanded keys when asked:
// crypto/aes keeps the key schedule (as good as the key) in a heap object
// that nothing clears, and the standard library offers no way to. Pass
// New where a cipher constructor is wanted (xts.NewCipher takes one) and
// defer Wipe.
type AESKeys struct {
	blocks []cipher.Block
}

// New returns aes.NewCipher(key), remembered for Wipe.
func (k *AESKeys) New(key []byte) (cipher.Block, error) {
	b, err := aes.NewCipher(key)
	if err == nil {
		k.blocks = append(k.blocks, b)
	}
	return b, err
}

// Wipe zeroes every cipher New made; they must not be used afterwards. It
// reports false when one could not be wiped: its type holds pointers, and
// zeroing those behind the garbage collector's back is unsafe, so it is
// left alone (a test holds the standard library's type to pointer-free).
func (k *AESKeys) Wipe() bool {
	ok := true
	for _, b := range k.blocks {
		ok = wipeObject(b) && ok
	}
	k.blocks = nil
	return ok
}

// wipeObject zeroes the object v points to when its type holds no
// pointers (the key schedule arrays and round count of crypto/aes).
func wipeObject(v any) bool {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() || hasPointers(rv.Type().Elem()) {
		return false
	}
	clear(unsafe.Slice((*byte)(rv.UnsafePointer()), rv.Type().Elem().Size()))
	return true
}

func hasPointers(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr,
		reflect.Float32, reflect.Float64, reflect.Complex64, reflect.Complex128:
		return false
	case reflect.Array:
		return t.Len() > 0 && hasPointers(t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			if hasPointers(t.Field(i).Type) {
				return true
			}
		}
		return false
	}
	return true
}
