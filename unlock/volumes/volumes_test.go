package volumes

import (
	"strings"
	"testing"
)

func TestActivationFlags(t *testing.T) {
	for _, tc := range []struct {
		spec    Spec
		release string
		want    string
	}{
		{Spec{NoWorkqueue: true}, "6.1.0-48-amd64", "no_read_workqueue no_write_workqueue"},
		{Spec{NoWorkqueue: true}, "5.9.0", "no_read_workqueue no_write_workqueue"},
		{Spec{NoWorkqueue: true}, "5.8.18", ""},
		{Spec{NoWorkqueue: false}, "6.1.0", ""},
		{Spec{NoWorkqueue: true, AllowDiscards: true}, "6.1.0", "allow_discards no_read_workqueue no_write_workqueue"},
		{Spec{AllowDiscards: true}, "4.19.0", "allow_discards"},
	} {
		if got := strings.Join(tc.spec.flags(tc.release), " "); got != tc.want {
			t.Errorf("%+v on %s: flags %q, want %q", tc.spec, tc.release, got, tc.want)
		}
	}
}
