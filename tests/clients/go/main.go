// A nats.go client driven by tests/clients: it connects through the callout with an nkey
// seed file and prints what happens as JSON lines on stdout, one event per line.
//
//	client -url URL -seed FILE connect            connect, then close (exit 1 if refused)
//	client -url URL -seed FILE publish SUBJECT    publish once, report the server's error
//	client -url URL -seed FILE stay               stay connected until closed for good
//
// Built by the tests in GOPATH mode against Debian's golang-github-nats-io-go-nats-dev.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
)

func emit(event string, fields map[string]interface{}) {
	if fields == nil {
		fields = map[string]interface{}{}
	}
	fields["event"] = event
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
}

func text(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func main() {
	url := flag.String("url", "", "server URL")
	seed := flag.String("seed", "", "nkey seed file")
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: client -url URL -seed FILE connect|publish SUBJECT|stay")
		os.Exit(2)
	}
	auth, err := nats.NkeyOptionFromSeed(*seed)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	closed := make(chan struct{})
	asyncErrors := make(chan error, 16)
	nc, err := nats.Connect(*url, auth,
		nats.Name("nats.go-client-test"),
		nats.MaxReconnects(2),
		nats.ReconnectWait(100*time.Millisecond),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			emit("async_error", map[string]interface{}{"error": text(err)})
			asyncErrors <- err
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			// nil: our own Close, not news.
			if err != nil {
				emit("disconnected", map[string]interface{}{"error": text(err)})
			}
		}),
		nats.ReconnectHandler(func(_ *nats.Conn) { emit("reconnected", nil) }),
		nats.ClosedHandler(func(c *nats.Conn) {
			emit("closed", map[string]interface{}{"last_error": text(c.LastError())})
			close(closed)
		}),
	)
	if err != nil {
		emit("connect_failed", map[string]interface{}{"error": text(err)})
		os.Exit(1)
	}
	emit("connected", map[string]interface{}{"server": nc.ConnectedServerId()})
	switch args[0] {
	case "connect":
		nc.Close()
	case "publish":
		if err := nc.Publish(args[1], []byte("hello")); err != nil {
			emit("publish_failed", map[string]interface{}{"error": text(err)})
		}
		// The server answers a refused publish with -ERR, after the PONG of this flush or
		// just before it: wait for the error a little longer.
		_ = nc.Flush()
		select {
		case <-asyncErrors:
		case <-time.After(5 * time.Second):
			emit("no_error", nil)
		}
		nc.Close()
	case "stay":
		select {
		case <-closed:
		case <-time.After(60 * time.Second):
			emit("still_connected", nil)
			nc.Close()
		}
		return
	default:
		fmt.Fprintln(os.Stderr, "unknown command", args[0])
		os.Exit(2)
	}
	<-closed
}
