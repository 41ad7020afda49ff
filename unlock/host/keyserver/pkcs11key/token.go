//go:build cgo

package pkcs11key

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/miekg/pkcs11"
)

// Available says whether this build can talk to PKCS#11 modules.
const Available = true

// MasterKeySize is the length of the derived master key (AES-256).
const MasterKeySize = 32

// kdfLabel is the SP 800-108 Label: which key this derivation is for.
const kdfLabel = "unlockrd/master-key/v1"

// MasterKey logs in to u's token, finds (or, if create, makes) the AES
// key labelled u.Object, and returns the master key the token derives
// from it; the caller wipes it. created says a new token key was made.
func MasterKey(u *URI, create bool) (key []byte, created bool, err error) {
	if _, err := os.Stat(u.ModulePath); err != nil {
		return nil, false, fmt.Errorf("pkcs11 URI module-path: %w", err)
	}
	p := pkcs11.New(u.ModulePath)
	if p == nil {
		return nil, false, fmt.Errorf("pkcs11 URI module-path %s: not a loadable PKCS#11 module", u.ModulePath)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		return nil, false, fmt.Errorf("pkcs11 module %s: initialize: %w", u.ModulePath, err)
	}
	defer p.Finalize()

	slot, err := findToken(p, u)
	if err != nil {
		return nil, false, err
	}
	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	if create {
		flags |= pkcs11.CKF_RW_SESSION
	}
	s, err := p.OpenSession(slot, flags)
	if err != nil {
		return nil, false, fmt.Errorf("pkcs11 token %q: open session: %w", u.Token, err)
	}
	defer p.CloseSession(s)
	pin, err := u.PIN()
	if err != nil {
		return nil, false, err
	}
	err = p.Login(s, pkcs11.CKU_USER, pin)
	pin = ""
	switch {
	case err == nil:
		defer p.Logout(s)
	case isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN):
	case isCode(err, pkcs11.CKR_PIN_INCORRECT), isCode(err, pkcs11.CKR_PIN_LEN_RANGE):
		return nil, false, fmt.Errorf("pkcs11 token %q: wrong PIN (pin-value/pin-source): %w", u.Token, err)
	case isCode(err, pkcs11.CKR_PIN_LOCKED):
		return nil, false, fmt.Errorf("pkcs11 token %q: PIN locked after too many wrong tries (pin-value/pin-source): %w", u.Token, err)
	default:
		return nil, false, fmt.Errorf("pkcs11 token %q: login: %w", u.Token, err)
	}

	obj, err := findKey(p, s, u)
	if errors.Is(err, errNoKey) && create {
		obj, err = generate(p, s, u)
		created = err == nil
	}
	if err != nil {
		return nil, false, err
	}
	key, err = derive(p, s, obj)
	if err != nil {
		return nil, false, fmt.Errorf("pkcs11 token %q object %q: derive the master key (AES-CMAC): %w", u.Token, u.Object, err)
	}
	return key, created, nil
}

func isCode(err error, code uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == code
}

// findToken returns the slot of the one token u selects.
func findToken(p *pkcs11.Ctx, u *URI) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("pkcs11 module %s: list slots: %w", u.ModulePath, err)
	}
	var found []uint
	var labels []string
	for _, sl := range slots {
		ti, err := p.GetTokenInfo(sl)
		if err != nil {
			continue
		}
		label := strings.TrimRight(ti.Label, " \x00")
		labels = append(labels, fmt.Sprintf("%q", label))
		if label != u.Token ||
			(u.Manufacturer != "" && strings.TrimRight(ti.ManufacturerID, " \x00") != u.Manufacturer) ||
			(u.Model != "" && strings.TrimRight(ti.Model, " \x00") != u.Model) ||
			(u.Serial != "" && strings.TrimRight(ti.SerialNumber, " \x00") != u.Serial) ||
			(u.SlotID != nil && *u.SlotID != sl) {
			continue
		}
		found = append(found, sl)
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		have := "no initialized token"
		if len(labels) > 0 {
			have = "tokens " + strings.Join(labels, ", ")
		}
		return 0, fmt.Errorf("pkcs11 URI token=%s: no such token in module %s (it has %s)", u.Token, u.ModulePath, have)
	}
	return 0, fmt.Errorf("pkcs11 URI token=%s: %d tokens match; add serial= or slot-id=", u.Token, len(found))
}

var errNoKey = errors.New("no such key")

func keyTemplate(u *URI) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, u.Object),
	}
	if u.ID != nil {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_ID, u.ID))
	}
	return t
}

func findKey(p *pkcs11.Ctx, s pkcs11.SessionHandle, u *URI) (pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(s, keyTemplate(u)); err != nil {
		return 0, fmt.Errorf("pkcs11 token %q: find object %q: %w", u.Token, u.Object, err)
	}
	objs, _, err := p.FindObjects(s, 2)
	p.FindObjectsFinal(s)
	if err != nil {
		return 0, fmt.Errorf("pkcs11 token %q: find object %q: %w", u.Token, u.Object, err)
	}
	switch len(objs) {
	case 1:
		return objs[0], nil
	case 0:
		return 0, fmt.Errorf("pkcs11 URI object=%s: token %q has no secret key with that label (`unlockrd-keyserver init --master-key URI` creates it): %w",
			u.Object, u.Token, errNoKey)
	}
	return 0, fmt.Errorf("pkcs11 URI object=%s: token %q has several secret keys with that label; add id=", u.Object, u.Token)
}

// generate makes the token key: AES-256, kept on the token, sensitive and
// never extractable, usable only to sign (the CMAC of the KDF).
func generate(p *pkcs11.Ctx, s pkcs11.SessionHandle, u *URI) (pkcs11.ObjectHandle, error) {
	t := append(keyTemplate(u),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	)
	o, err := p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, t)
	if err != nil {
		return 0, fmt.Errorf("pkcs11 token %q: create AES key %q: %w", u.Token, u.Object, err)
	}
	return o, nil
}

// derive is SP 800-108 counter mode with AES-CMAC: block i is
// CMAC(K, [i]_8 || Label || 0x00 || [256]_16), two blocks for 256 bits.
// Context is empty: every replica must derive the same key.
func derive(p *pkcs11.Ctx, s pkcs11.SessionHandle, o pkcs11.ObjectHandle) ([]byte, error) {
	key := make([]byte, 0, MasterKeySize)
	for i := byte(1); len(key) < MasterKeySize; i++ {
		in := append([]byte{i}, kdfLabel...)
		in = append(in, 0)
		in = binary.BigEndian.AppendUint16(in, 8*MasterKeySize)
		if err := p.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)}, o); err != nil {
			clear(key)
			return nil, err
		}
		mac, err := p.Sign(s, in)
		if err != nil {
			clear(key)
			return nil, err
		}
		if len(mac) != 16 {
			clear(key)
			clear(mac)
			return nil, fmt.Errorf("CMAC of %d bytes, want 16", len(mac))
		}
		key = append(key, mac...)
		clear(mac)
	}
	return key, nil
}
