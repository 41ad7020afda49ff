package config

import "fmt"

// The YAML parser lives in the host-only package yamlconfig; these methods
// use the yaml.v2-style signature that gopkg.in/yaml.v3 also honours, so
// this package (and the init, which links it) needs no YAML import.

// UnmarshalYAML reads "10s", "2m" or 0.
func (d *Duration) UnmarshalYAML(unmarshal func(any) error) error {
	var s string
	if err := unmarshal(&s); err != nil {
		return fmt.Errorf("want a duration like 10s")
	}
	v, err := parseDuration(s)
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// UnmarshalYAML accepts a scalar or a sequence of scalars and parses them.
func (p *IPPlan) UnmarshalYAML(unmarshal func(any) error) error {
	var vs []string
	var one string
	if err := unmarshal(&one); err == nil {
		vs = []string{one}
	} else if err := unmarshal(&vs); err != nil {
		return fmt.Errorf("want a string or a list of strings")
	}
	v, err := ParseIPPlan(vs)
	if err != nil {
		return err
	}
	*p = v
	return nil
}

// UnmarshalYAML reads true, false or random.
func (m *SwapMode) UnmarshalYAML(unmarshal func(any) error) error {
	var v any
	if err := unmarshal(&v); err != nil {
		return fmt.Errorf("swap: want true, false or random")
	}
	if _, ok := v.(map[string]any); ok {
		return fmt.Errorf("swap: want true, false or random")
	}
	if _, ok := v.([]any); ok {
		return fmt.Errorf("swap: want true, false or random")
	}
	return m.set(v)
}
