package cliflag

import (
	"errors"
	"flag"
	"io"
	"reflect"
	"testing"
)

func TestParseInterleaved(t *testing.T) {
	fs := NewFlagSet("host add", io.Discard)
	data := fs.String("data", "", "")
	var san Multi
	fs.Var(&san, "san", "")
	pos, err := Parse(fs, []string{"NAME", "--data", "DIR", "--san", "a", "OTHER", "--san=b"})
	if err != nil {
		t.Fatal(err)
	}
	if *data != "DIR" || !reflect.DeepEqual(pos, []string{"NAME", "OTHER"}) || !reflect.DeepEqual([]string(san), []string{"a", "b"}) {
		t.Errorf("data %q, positional %q, san %q", *data, pos, san)
	}
}

func TestParseErrors(t *testing.T) {
	fs := NewFlagSet("serve", io.Discard)
	_, err := Parse(fs, []string{"--bogus"})
	if !errors.Is(err, ErrUsage) || Status(err) != 2 {
		t.Errorf("bad flag: %v, status %d", err, Status(err))
	}
	if want := "usage: serve: flag provided but not defined: -bogus"; err == nil || err.Error() != want {
		t.Errorf("bad flag: %q, want %q", err, want)
	}
	_, err = Parse(NewFlagSet("serve", io.Discard), []string{"-h"})
	if !errors.Is(err, flag.ErrHelp) || Status(err) != 0 {
		t.Errorf("-h: %v, status %d", err, Status(err))
	}
}

func TestStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{flag.ErrHelp, 0},
		{Usagef("no command"), 2},
		{errors.New("disk on fire"), 1},
	} {
		if got := Status(tc.err); got != tc.want {
			t.Errorf("Status(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}
