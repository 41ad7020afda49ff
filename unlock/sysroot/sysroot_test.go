package sysroot

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestFlags(t *testing.T) {
	for _, tc := range []struct {
		opts  []string
		flags uintptr
		data  string
	}{
		{[]string{"ro"}, unix.MS_RDONLY, ""},
		{[]string{"ro", "rw"}, 0, ""},
		{[]string{"noatime", "nodev", "data=ordered", "errors=remount-ro"}, unix.MS_NOATIME | unix.MS_NODEV, "data=ordered,errors=remount-ro"},
		{[]string{"defaults"}, 0, ""},
	} {
		f, d := Flags(tc.opts)
		if f != tc.flags || d != tc.data {
			t.Errorf("Flags(%v) = %#x %q, want %#x %q", tc.opts, f, d, tc.flags, tc.data)
		}
	}
}

func TestSwitchRootRefusesWhenNotPID1(t *testing.T) {
	if err := SwitchRoot(t.TempDir(), "/sbin/init", nil); err == nil {
		t.Fatal("SwitchRoot ran outside PID 1")
	}
}
