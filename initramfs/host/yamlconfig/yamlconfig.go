// Package yamlconfig reads unlockrd.yaml (DESIGN §3) for the image
// builder. It is host-only: the image embeds the validated configuration
// as JSON, so the init never links a YAML parser.
package yamlconfig

import (
	"bytes"
	"encoding"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"gopkg.in/yaml.v3"
)

// Parse reads a YAML configuration strictly: unknown keys, wrong types and
// invalid values are errors naming the field. The result is normalized and
// validated.
func Parse(data []byte) (*config.Config, error) {
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("configuration is empty")
		}
		return nil, fmt.Errorf("YAML: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("configuration holds more than one YAML document")
	}
	if err := checkKeys(&root, reflect.TypeOf(config.Config{}), ""); err != nil {
		return nil, err
	}
	var c config.Config
	if err := root.Decode(&c); err != nil {
		return nil, typeErr(err)
	}
	c.Normalize()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// checkKeys walks the YAML tree beside the Go type and reports the first key
// the type does not have, with its full path, so the user sees
// "key.pinz: unknown field" rather than a Go type name.
func checkKeys(n *yaml.Node, t reflect.Type, at string) error {
	if n.Kind == yaml.DocumentNode {
		if len(n.Content) == 0 {
			return nil
		}
		return checkKeys(n.Content[0], t, at)
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if isLeaf(t) {
		return nil // a typed leaf (pins, ip=, source words) decodes itself
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			if n.Tag == "!!null" {
				return nil
			}
			return &config.FieldError{Field: orTop(at), Msg: fmt.Sprintf("line %d: want a mapping", n.Line)}
		}
		fields := map[string]reflect.StructField{}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := strings.Split(f.Tag.Get("yaml"), ",")[0]
			if name == "" || name == "-" {
				continue
			}
			fields[name] = f
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := join(at, k.Value)
			f, ok := fields[k.Value]
			if !ok {
				return &config.FieldError{Field: p, Msg: fmt.Sprintf("line %d: unknown field", k.Line)}
			}
			if seen[k.Value] {
				return &config.FieldError{Field: p, Msg: fmt.Sprintf("line %d: given twice", k.Line)}
			}
			seen[k.Value] = true
			if err := checkKeys(v, f.Type, p); err != nil {
				return err
			}
			// Decoding the field alone ties a type error to its path.
			if err := v.Decode(reflect.New(f.Type).Interface()); err != nil {
				msg := strings.TrimPrefix(typeErr(err).Error(), "YAML: ")
				if !strings.HasPrefix(msg, "line ") {
					msg = fmt.Sprintf("line %d: %s", v.Line, msg)
				}
				return &config.FieldError{Field: p, Msg: msg}
			}
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return nil // scalars are checked by Decode (StringList takes one)
		}
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", at, i)
			if err := checkKeys(c, t.Elem(), p); err != nil {
				return err
			}
			// A leaf decoded alone ties its error to its index
			// (key.pins[1], not key.pins).
			if isLeaf(t.Elem()) {
				if err := c.Decode(reflect.New(t.Elem()).Interface()); err != nil {
					return &config.FieldError{Field: p, Msg: strings.TrimPrefix(typeErr(err).Error(), "YAML: ")}
				}
			}
		}
	}
	return nil
}

// isLeaf reports whether t decodes itself from YAML (a typed leaf of the
// configuration) rather than being walked field by field.
func isLeaf(t reflect.Type) bool {
	pt := reflect.PointerTo(t)
	return pt.Implements(reflect.TypeFor[yaml.Unmarshaler]()) ||
		pt.Implements(reflect.TypeFor[encoding.TextUnmarshaler]()) ||
		pt.Implements(reflect.TypeFor[obsoleteUnmarshaler]())
}

// obsoleteUnmarshaler is the yaml.v2-style method the config leaves use
// (so that package config needs no YAML import); yaml.v3 honours it.
type obsoleteUnmarshaler interface {
	UnmarshalYAML(unmarshal func(any) error) error
}

func join(at, k string) string {
	if at == "" {
		return k
	}
	return at + "." + k
}

func orTop(at string) string {
	if at == "" {
		return "(top level)"
	}
	return at
}

// typeErr rewrites yaml.v3's type errors, which name Go types, to name lines.
func typeErr(err error) error {
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		return fmt.Errorf("YAML: %s", strings.Join(te.Errors, "; "))
	}
	var fe *config.FieldError
	if errors.As(err, &fe) {
		return fe
	}
	return fmt.Errorf("YAML: %w", err)
}
