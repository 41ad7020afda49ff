package keys

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// response is what the key fetch needs of an HTTP answer.
type response struct {
	status      int
	contentType string
	retryAfter  string
	location    string
	date        string
	// body is the 200 body: a window into raw.
	body []byte
	// raw is the one buffer the response was read into. It holds key
	// material beyond body too (framing moved out of the way), so wipe
	// clears all of it.
	raw []byte
}

// wipe zeroes everything the response was read into.
func (r *response) wipe() {
	if r != nil {
		clear(r.raw[:cap(r.raw)])
	}
}

// phase names the part of an attempt that failed, for the status line.
type phase string

const (
	phaseConnect   phase = "TCP connection"
	phaseHandshake phase = "TLS handshake"
	phaseAnswer    phase = "answer"
)

// phaseError is a failure in one phase of a request.
type phaseError struct {
	phase phase
	err   error
}

func (e *phaseError) Error() string { return e.err.Error() }
func (e *phaseError) Unwrap() error { return e.err }

// get performs one GET over a fresh pinned TLS connection.
//
// This is a deliberately small HTTP/1.1 client rather than net/http: the
// request, including the bearer token, is built in a byte slice that is
// wiped afterwards (net/http keeps headers in immutable strings); the
// response is read into a single buffer the caller wipes (net/http and
// bufio keep copies in buffers nobody can reach); the body limit is
// enforced while reading; and the init binary stays megabytes smaller,
// which matters for an image that has to be fetched over PXE.
func get(ctx context.Context, u *url.URL, token []byte, cfg *tls.Config, dialer *net.Dialer) (*response, error) {
	return do(ctx, u, token, nil, cfg, dialer)
}

// do is get, or a POST of body (JSON, no secrets in it) when body is not
// nil: the confirmation request.
func do(ctx context.Context, u *url.URL, token, body []byte, cfg *tls.Config, dialer *net.Dialer) (*response, error) {
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "443")
	}
	raw, err := dialer.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, &phaseError{phaseConnect, err}
	}
	defer raw.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	// Closing the socket is what interrupts a blocked read when the
	// context ends early (the deadline alone covers the timeout case).
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	// The handshake completes only once VerifyConnection (the pin check)
	// has passed, in TLS 1.2 and 1.3 alike: the client's Finished is sent
	// after it, and no application data before Finished. So a server that
	// fails the pin never sees the request or the token.
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		return nil, &phaseError{phaseHandshake, fmt.Errorf("TLS: %w", err)}
	}

	req := buildRequest(u, token, body)
	_, err = conn.Write(req)
	clear(req)
	if err != nil {
		return nil, &phaseError{phaseAnswer, fmt.Errorf("send request: %w", err)}
	}
	resp, err := readResponse(conn)
	if err != nil {
		return nil, &phaseError{phaseAnswer, err}
	}
	return resp, nil
}

func buildRequest(u *url.URL, token, body []byte) []byte {
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	if u.RawQuery != "" {
		path += "?" + u.RawQuery
	}
	n := 256 + len(path) + len(u.Host) + len(token) + len(body)
	b := make([]byte, 0, n) // sized up front: append must not reallocate and leave a copy of the token behind
	if body != nil {
		b = append(b, "POST "...)
	} else {
		b = append(b, "GET "...)
	}
	b = append(b, path...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, u.Host...)
	b = append(b, "\r\nUser-Agent: unlockrd\r\nAccept: application/json, application/octet-stream\r\nConnection: close\r\n"...)
	if len(token) > 0 {
		b = append(b, "Authorization: Bearer "...)
		b = append(b, token...)
		b = append(b, "\r\n"...)
	}
	if body != nil {
		b = append(b, "Content-Type: application/json\r\nContent-Length: "...)
		b = strconv.AppendInt(b, int64(len(body)), 10)
		b = append(b, "\r\n\r\n"...)
		return append(b, body...)
	}
	b = append(b, "\r\n"...)
	return b
}

// Limits on what a server may send.
const (
	// maxHeaderBytes bounds the status line and headers of one response.
	maxHeaderBytes = 16 << 10
	// maxChunkLine bounds a chunk-size line (with extensions).
	maxChunkLine = 4 << 10
	// maxInterim bounds the 1xx responses skipped before the real one.
	maxInterim = 8
	// maxBuffer bounds the read buffer: headers, the decoded body and
	// at most one pending chunk line or read.
	maxBuffer = maxHeaderBytes + keyproto.MaxBody + maxChunkLine + 16<<10
)

// errTooLarge is returned when the body exceeds keyproto.MaxBody.
var errTooLarge = fmt.Errorf("response body exceeds %d bytes", keyproto.MaxBody)

// reader reads a response into one growing buffer that it alone owns, so
// that every byte of key material that passes through it can be wiped:
// growing copies by hand and wipes the old array; chunk framing is
// removed in place and the vacated tail wiped.
type reader struct {
	r   io.Reader
	buf []byte
	eof bool
}

// fill reads once more into buf. It returns io.EOF (once the peer has
// closed and nothing more came) or the read error.
func (rd *reader) fill() error {
	if rd.eof {
		return io.EOF
	}
	if len(rd.buf) == cap(rd.buf) {
		if cap(rd.buf) >= maxBuffer {
			return errTooLarge
		}
		nb := make([]byte, len(rd.buf), min(max(2*cap(rd.buf), 4096), maxBuffer))
		copy(nb, rd.buf)
		clear(rd.buf[:cap(rd.buf)])
		rd.buf = nb
	}
	n, err := rd.r.Read(rd.buf[len(rd.buf):cap(rd.buf)])
	rd.buf = rd.buf[:len(rd.buf)+n]
	if errors.Is(err, io.EOF) {
		rd.eof = true
		if n > 0 {
			return nil
		}
		return io.EOF
	}
	if n > 0 {
		return nil // a later read returns the error again, if it persists
	}
	if err == nil {
		// A reader that returns 0, nil repeatedly would spin; Go's net
		// and tls readers don't, but be safe.
		return io.ErrNoProgress
	}
	return err
}

// readResponse reads one HTTP/1.1 response. It skips interim (1xx)
// answers, returns non-200 answers without their body, and for a 200 reads
// the body framed by Content-Length or chunked coding, refusing bodies
// over keyproto.MaxBody. On error everything read is wiped; on success
// the caller wipes the response. No error quotes body bytes.
func readResponse(r io.Reader) (resp *response, err error) {
	rd := &reader{r: r, buf: make([]byte, 0, 4096)}
	defer func() {
		if err != nil {
			clear(rd.buf[:cap(rd.buf)])
		}
	}()
	var hdrEnd int
	var h *header
	for interim := 0; ; {
		hdrEnd = headerEnd(rd.buf)
		if hdrEnd < 0 {
			if len(rd.buf) > maxHeaderBytes {
				return nil, fmt.Errorf("response headers exceed %d bytes", maxHeaderBytes)
			}
			if err := rd.fill(); err != nil {
				if errors.Is(err, io.EOF) {
					if len(rd.buf) == 0 {
						return nil, errors.New("connection closed without an answer")
					}
					return nil, errors.New("connection closed inside the response headers")
				}
				if errors.Is(err, errTooLarge) {
					return nil, fmt.Errorf("response headers exceed %d bytes", maxHeaderBytes)
				}
				return nil, fmt.Errorf("read headers: %w", err)
			}
			continue
		}
		if hdrEnd > maxHeaderBytes {
			return nil, fmt.Errorf("response headers exceed %d bytes", maxHeaderBytes)
		}
		h, err = parseHeader(rd.buf[:hdrEnd])
		if err != nil {
			return nil, err
		}
		if h.status >= 200 || h.status == 101 {
			break
		}
		// An interim answer (100 Continue, 103 Early Hints): the real
		// one follows on the same connection.
		if interim++; interim > maxInterim {
			return nil, fmt.Errorf("more than %d interim (1xx) answers", maxInterim)
		}
		n := copy(rd.buf, rd.buf[hdrEnd:])
		clear(rd.buf[n:])
		rd.buf = rd.buf[:n]
	}
	resp = &h.response
	if resp.status == 101 {
		return nil, errors.New("unexpected 101 Switching Protocols")
	}
	if resp.status != 200 {
		// Error bodies are not needed; the status says it all.
		clear(rd.buf[:cap(rd.buf)])
		return resp, nil
	}
	var body []byte
	switch h.framing {
	case framingChunked:
		body, err = rd.chunked(hdrEnd)
	case framingLength:
		body, err = rd.sized(hdrEnd, h.length)
	default:
		// Reading to the end of the connection would accept a cut-off
		// body: TLS reports a close at a record boundary as a plain EOF,
		// and a short raw key would be tried as if it were whole.
		err = errors.New("200 answer without Content-Length or chunked framing refused (a cut-off body could not be detected)")
	}
	if err != nil {
		return nil, err
	}
	resp.body = body
	resp.raw = rd.buf
	return resp, nil
}

// sized reads a body of exactly n bytes after the headers.
func (rd *reader) sized(start int, n int64) ([]byte, error) {
	if n > keyproto.MaxBody {
		return nil, errTooLarge
	}
	end := start + int(n)
	for len(rd.buf) < end {
		if err := rd.fill(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("body cut short: %d of %d bytes", len(rd.buf)-start, n)
			}
			return nil, fmt.Errorf("read body: %w", err)
		}
	}
	clear(rd.buf[end:])
	rd.buf = rd.buf[:end]
	return rd.buf[start:end], nil
}

// chunked decodes a chunked body in place: the decoded bytes are moved
// down over the framing as they arrive, so the buffer never holds more
// than the decoded body and one pending piece of framing.
func (rd *reader) chunked(start int) ([]byte, error) {
	w := start     // end of the decoded body
	r := start     // next raw byte to decode
	var left int64 // data bytes still due in the current chunk
	needCRLF := false
	for {
		progress := true
		for progress {
			progress = false
			switch {
			case left > 0:
				n := int(min(int64(len(rd.buf)-r), left))
				if n > 0 {
					copy(rd.buf[w:], rd.buf[r:r+n])
					w, r, left = w+n, r+n, left-int64(n)
					progress = true
				}
				if left == 0 {
					needCRLF = true
				}
			case needCRLF:
				if len(rd.buf)-r >= 2 {
					if rd.buf[r] != '\r' || rd.buf[r+1] != '\n' {
						return nil, errors.New("malformed chunk: data not followed by CRLF")
					}
					r += 2
					needCRLF = false
					progress = true
				}
			default:
				i := bytes.IndexByte(rd.buf[r:], '\n')
				if i < 0 {
					if len(rd.buf)-r > maxChunkLine {
						return nil, fmt.Errorf("chunk-size line exceeds %d bytes", maxChunkLine)
					}
					break
				}
				if i > maxChunkLine {
					return nil, fmt.Errorf("chunk-size line exceeds %d bytes", maxChunkLine)
				}
				n, err := parseChunkSize(rd.buf[r : r+i])
				if err != nil {
					return nil, err
				}
				r += i + 1
				if n == 0 {
					// The last chunk. Trailers are not needed and the
					// connection is closed, so they are not read.
					clear(rd.buf[w:])
					rd.buf = rd.buf[:w]
					return rd.buf[start:w], nil
				}
				if n > int64(keyproto.MaxBody-(w-start)) {
					return nil, errTooLarge
				}
				left = n
				progress = true
			}
		}
		// Move what is not yet decoded down to the end of the decoded
		// body, wiping the vacated tail.
		if r > w {
			m := copy(rd.buf[w:], rd.buf[r:])
			clear(rd.buf[w+m:])
			rd.buf = rd.buf[:w+m]
			r = w
		}
		if err := rd.fill(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errors.New("chunked body cut short (no last chunk)")
			}
			if errors.Is(err, errTooLarge) {
				return nil, errTooLarge
			}
			return nil, fmt.Errorf("read body: %w", err)
		}
	}
}

// parseChunkSize reads "HEX[;ext]CR" (the line without its LF). A bare LF
// is refused, as net/http does since it was used for request smuggling.
func parseChunkSize(line []byte) (int64, error) {
	line, ok := bytes.CutSuffix(line, []byte("\r"))
	if !ok {
		return 0, errors.New("malformed chunk-size line (no CRLF)")
	}
	if bytes.IndexByte(line, '\r') >= 0 {
		return 0, errors.New("malformed chunk-size line (stray CR)")
	}
	// As net/http does: trailing whitespace goes, then any extension;
	// whitespace before the ';' is refused.
	line = bytes.TrimRight(line, " \t")
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		line = line[:i]
	}
	if len(line) == 0 || len(line) > 8 {
		return 0, errors.New("malformed chunk size")
	}
	var n int64
	for _, c := range line {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, errors.New("malformed chunk size")
		}
		n = n<<4 | int64(d)
	}
	return n, nil
}

// headerEnd returns the length of the header block (status line, headers
// and the blank line) at the start of b, or -1 if it is not complete.
func headerEnd(b []byte) int {
	for i := 0; i < len(b); {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		line := b[i : i+j]
		i += j + 1
		if len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return i
		}
	}
	return -1
}

// body framings.
const (
	framingNone = iota
	framingLength
	framingChunked
)

// header is parseHeader's result before the body is read.
type header struct {
	response
	framing int
	length  int64
}

// parseHeader parses the status line and headers. No error quotes what
// the server sent (so none can carry key bytes, whatever the server
// does); nothing after the header block is looked at.
func parseHeader(b []byte) (*header, error) {
	lines := strings.Split(strings.TrimRight(string(b), "\r\n"), "\n")
	status := strings.TrimSuffix(lines[0], "\r")
	proto, rest, _ := strings.Cut(status, " ")
	if proto != "HTTP/1.1" && proto != "HTTP/1.0" {
		return nil, errors.New("not an HTTP/1.x response")
	}
	codeStr, _, _ := strings.Cut(rest, " ")
	if len(codeStr) != 3 || codeStr[0] < '1' || codeStr[0] > '5' {
		return nil, errors.New("malformed status code")
	}
	code, err := strconv.Atoi(codeStr)
	if err != nil {
		return nil, errors.New("malformed status code")
	}
	h := &header{response: response{status: code}}
	var te []string
	var cl string
	for _, l := range lines[1:] {
		l = strings.TrimSuffix(l, "\r")
		if l == "" {
			continue
		}
		if l[0] == ' ' || l[0] == '\t' {
			return nil, errors.New("malformed header: obsolete line folding")
		}
		name, value, ok := strings.Cut(l, ":")
		if !ok || !isToken(name) {
			return nil, errors.New("malformed header line")
		}
		value = strings.Trim(value, " \t")
		switch strings.ToLower(name) {
		case "content-type":
			h.contentType = value
		case "retry-after":
			h.retryAfter = value
		case "location":
			h.location = value
		case "date":
			h.date = value
		case "transfer-encoding":
			te = append(te, value)
		case "content-length":
			if cl != "" && cl != value {
				return nil, errors.New("conflicting Content-Length headers")
			}
			cl = value
		}
	}
	switch {
	case len(te) > 0:
		// Transfer-Encoding overrides Content-Length (RFC 9112 §6.3).
		// Only chunked: nothing else is needed for a key, and the error
		// does not quote the value (no error quotes what a server sent).
		if v := strings.ToLower(strings.Join(te, ",")); strings.TrimSpace(v) != "chunked" {
			return nil, errors.New("unsupported transfer encoding (only chunked is accepted)")
		}
		h.framing = framingChunked
	case cl != "":
		n, err := strconv.ParseUint(cl, 10, 63)
		if err != nil || cl[0] == '+' {
			return nil, errors.New("malformed Content-Length")
		}
		h.framing, h.length = framingLength, int64(n)
	}
	return h, nil
}

// isToken reports whether s is an HTTP token (a valid header name).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// parseRetryAfter reads delay-seconds or an HTTP date. A date is taken
// relative to the server's own Date header when there is one: the
// initramfs clock may be far off, the server's two timestamps are not.
func parseRetryAfter(v, date string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if s, err := strconv.ParseUint(v, 10, 63); err == nil && v[0] != '+' {
		if s > uint64(maxRetryAfter/time.Second) {
			return maxRetryAfter, true
		}
		return time.Duration(s) * time.Second, true
	}
	t, err := parseHTTPDate(v)
	if err != nil {
		return 0, false
	}
	if d, err := parseHTTPDate(strings.TrimSpace(date)); err == nil {
		now = d
	}
	return max(t.Sub(now), 0), true
}

// parseHTTPDate reads the three date formats HTTP allows (RFC 9110 §5.6.7).
func parseHTTPDate(s string) (time.Time, error) {
	var err error
	for _, layout := range []string{time.RFC1123, time.RFC850, time.ANSIC} {
		var t time.Time
		if t, err = time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, err
}
