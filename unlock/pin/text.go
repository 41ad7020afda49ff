package pin

// A pin is written as text everywhere it is stored (the image's JSON
// configuration, unlockrd.yaml), so configuration types can hold a Pin and
// still read and write the "sha256//..." strings older images carry.

// MarshalText writes the pin in curl's form.
func (p Pin) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads what MarshalText writes, as strictly as Parse.
func (p *Pin) UnmarshalText(b []byte) error {
	v, err := Parse(string(b))
	if err != nil {
		return err
	}
	*p = v
	return nil
}
