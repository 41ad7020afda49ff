package config

import (
	"strconv"
	"strings"
)

// Validation uses these small matchers instead of regular expressions:
// package regexp would add ~50 KB to an init that has to stay small, for
// checks this simple.

// charset matches strings of 1..max bytes whose first byte satisfies first
// and the others rest.
type charset struct {
	first, rest func(byte) bool
	max         int
}

// MatchString reports whether s matches.
func (c charset) MatchString(s string) bool {
	if len(s) == 0 || len(s) > c.max || !c.first(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if !c.rest(s[i]) {
			return false
		}
	}
	return true
}

func alnum(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9'
}

func lowerDigit(b byte) bool { return b >= 'a' && b <= 'z' || b >= '0' && b <= '9' }

func anyOf(class func(byte) bool, extra string) func(byte) bool {
	return func(b byte) bool { return class(b) || strings.IndexByte(extra, b) >= 0 }
}

func hexDigit(b byte) bool {
	return b >= '0' && b <= '9' || b >= 'a' && b <= 'f' || b >= 'A' && b <= 'F'
}

// uuidForms lists accepted shapes as dash-separated group lengths.
type uuidForms []string

// MatchString reports whether s is hex digits grouped like one of the forms.
func (u uuidForms) MatchString(s string) bool {
	for _, form := range u {
		groups := strings.Split(form, "-")
		parts := strings.Split(s, "-")
		if len(parts) != len(groups) {
			continue
		}
		ok := true
		for i, g := range groups {
			n, _ := strconv.Atoi(g)
			if len(parts[i]) != n || strings.IndexFunc(parts[i], func(r rune) bool { return r > 0x7f || !hexDigit(byte(r)) }) >= 0 {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}
