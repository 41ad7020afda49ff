package keys

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
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
	body        []byte // key material on 200: the caller wipes it
}

// get performs one GET over a fresh pinned TLS connection.
//
// This is a deliberately small HTTP/1.1 client rather than net/http: the
// request, including the bearer token, is built in a byte slice that is
// wiped afterwards (net/http keeps headers in immutable strings), the body
// limit is enforced while reading, and the init binary stays megabytes
// smaller, which matters for an image that has to be fetched over PXE.
func get(ctx context.Context, u *url.URL, token []byte, cfg *tls.Config, dialer *net.Dialer) (*response, error) {
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "443")
	}
	raw, err := dialer.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	// Closing the socket is what interrupts a blocked read when the
	// context ends early (the deadline alone covers the timeout case).
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("TLS: %w", err)
	}

	req := buildRequest(u, token)
	_, err = conn.Write(req)
	clear(req)
	if err != nil {
		return nil, fmt.Errorf("send request: %w", err)
	}
	return readResponse(bufio.NewReaderSize(conn, 4096))
}

func buildRequest(u *url.URL, token []byte) []byte {
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	if u.RawQuery != "" {
		path += "?" + u.RawQuery
	}
	n := 256 + len(path) + len(u.Host) + len(token)
	b := make([]byte, 0, n) // sized up front: append must not reallocate and leave a copy of the token behind
	b = append(b, "GET "...)
	b = append(b, path...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, u.Host...)
	b = append(b, "\r\nUser-Agent: unlockrd\r\nAccept: application/json, application/octet-stream\r\nConnection: close\r\n"...)
	if len(token) > 0 {
		b = append(b, "Authorization: Bearer "...)
		b = append(b, token...)
		b = append(b, "\r\n"...)
	}
	b = append(b, "\r\n"...)
	return b
}

// errTooLarge is returned when the body exceeds keyproto.MaxBody.
var errTooLarge = fmt.Errorf("response body exceeds %d bytes", keyproto.MaxBody)

func readResponse(br *bufio.Reader) (*response, error) {
	tp := textproto.NewReader(br)
	line, err := tp.ReadLine()
	if err != nil {
		return nil, fmt.Errorf("read status line: %w", err)
	}
	proto, rest, _ := strings.Cut(line, " ")
	codeStr, _, _ := strings.Cut(rest, " ")
	if !strings.HasPrefix(proto, "HTTP/1.") {
		return nil, fmt.Errorf("not an HTTP/1.x response")
	}
	code, err := strconv.Atoi(codeStr)
	if err != nil || code < 100 || code > 999 {
		return nil, fmt.Errorf("malformed status code")
	}
	hdr, err := tp.ReadMIMEHeader()
	if err != nil {
		return nil, fmt.Errorf("read headers: %w", err)
	}
	r := &response{
		status:      code,
		contentType: hdr.Get("Content-Type"),
		retryAfter:  hdr.Get("Retry-After"),
		location:    hdr.Get("Location"),
	}
	if code != 200 {
		// Error bodies are not needed; the status says it all.
		return r, nil
	}
	var body io.Reader = br
	switch te := strings.ToLower(hdr.Get("Transfer-Encoding")); {
	case te == "chunked":
		body = newChunkedReader(br)
	case te != "" && te != "identity":
		return nil, fmt.Errorf("unsupported transfer encoding %q", te)
	case hdr.Get("Content-Length") != "":
		n, err := strconv.ParseInt(hdr.Get("Content-Length"), 10, 64)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("malformed Content-Length")
		}
		if n > keyproto.MaxBody {
			return nil, errTooLarge
		}
		body = io.LimitReader(br, n)
	}
	buf := make([]byte, 0, 512)
	tmp := make([]byte, 4096)
	defer clear(tmp)
	for {
		n, err := body.Read(tmp)
		if len(buf)+n > keyproto.MaxBody {
			clear(buf[:cap(buf)])
			return nil, errTooLarge
		}
		if len(buf)+n > cap(buf) {
			// Grow by hand so the old backing array can be wiped.
			nb := make([]byte, len(buf), 2*cap(buf)+n)
			copy(nb, buf)
			clear(buf[:cap(buf)])
			buf = nb
		}
		buf = append(buf, tmp[:n]...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			clear(buf[:cap(buf)])
			return nil, fmt.Errorf("read body: %w", err)
		}
	}
	r.body = buf
	return r, nil
}

// chunkedReader decodes HTTP/1.1 chunked transfer coding.
type chunkedReader struct {
	br   *bufio.Reader
	left int64
	done bool
}

func newChunkedReader(br *bufio.Reader) *chunkedReader { return &chunkedReader{br: br} }

func (c *chunkedReader) Read(p []byte) (int, error) {
	if c.done {
		return 0, io.EOF
	}
	if c.left == 0 {
		line, err := c.br.ReadSlice('\n')
		if err != nil {
			return 0, fmt.Errorf("chunk header: %w", err)
		}
		s := strings.TrimSpace(string(line))
		s, _, _ = strings.Cut(s, ";")
		n, err := strconv.ParseInt(s, 16, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("malformed chunk size")
		}
		if n > keyproto.MaxBody {
			return 0, errTooLarge
		}
		if n == 0 {
			c.done = true
			return 0, io.EOF
		}
		c.left = n
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.br.Read(p)
	c.left -= int64(n)
	if c.left == 0 && err == nil {
		var crlf [2]byte
		if _, err := io.ReadFull(c.br, crlf[:]); err != nil || crlf != [2]byte{'\r', '\n'} {
			return n, fmt.Errorf("malformed chunk trailer")
		}
	}
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// parseRetryAfter reads delay-seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second, true
	}
	if t, err := time.Parse(time.RFC1123, v); err == nil {
		d := t.Sub(now)
		if d < 0 {
			d = 0
		}
		return d, true
	}
	return 0, false
}
