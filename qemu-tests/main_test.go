package qemutests

import (
	"flag"
	"fmt"
	"os"
	"testing"
)

// TestMain skips the whole package under -short: every test here boots
// QEMU (minutes under TCG), and -short asks for the unit tests only. Any
// other run needs the kernels and QEMU, and a missing one fails the test.
func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("qemu-tests: -short: every test here boots QEMU; skipped")
		os.Exit(0)
	}
	os.Exit(m.Run())
}
