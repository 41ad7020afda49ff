package keyproto

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"slices"
)

// AppendJSON appends to dst the same body Encode returns, but writes the
// base64 of each key straight into the result, allocated once at its final
// size: no string, encoder buffer or reallocation ever holds key material,
// so the caller can wipe the only copy (clear) once the body is sent.
// Encode, through encoding/json, leaves copies in immutable strings and in
// the encoder's pooled buffers.
func AppendJSON(dst []byte, ids []string, keys [][]byte) ([]byte, error) {
	return AppendResponse(dst, "", ids, keys)
}

// AppendResponse is AppendJSON with the host's state (Response.State),
// left out when empty.
func AppendResponse(dst []byte, state string, ids []string, keys [][]byte) ([]byte, error) {
	if len(ids) != len(keys) {
		return nil, errors.New("keyproto: ids and keys differ in length")
	}
	qids := make([][]byte, len(ids))
	var qstate []byte
	if state != "" {
		q, err := json.Marshal(state)
		if err != nil {
			return nil, err
		}
		qstate = q
	}
	n := len(`{"keys":[],"state":}`) + len(qstate) + max(len(ids)-1, 0) // the commas
	for i, id := range ids {
		q, err := json.Marshal(id) // ids are not secret
		if err != nil {
			return nil, err
		}
		qids[i] = q
		n += len(`{"id":,"key":""}`) + len(q) + base64.StdEncoding.EncodedLen(len(keys[i]))
	}
	dst = slices.Grow(dst, n)
	dst = append(dst, `{"keys":[`...)
	for i := range keys {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, `{"id":`...)
		dst = append(dst, qids[i]...)
		dst = append(dst, `,"key":"`...)
		dst = base64.StdEncoding.AppendEncode(dst, keys[i])
		dst = append(dst, `"}`...)
	}
	dst = append(dst, ']')
	if qstate != nil {
		dst = append(dst, `,"state":`...)
		dst = append(dst, qstate...)
	}
	return append(dst, '}'), nil
}
