// goi drives etcd's Go coordination code (clientv3/concurrency and contrib/recipes, etcd
// 3.4) for the interop tests in crates/baton-testkit/tests/interop_go.rs, which build it
// and check that Go and Baton processes share locks, elections, barriers and queues.
//
// It builds in GOPATH mode against Debian's golang-etcd-server-dev (etcd 3.4.23's sources
// under /usr/share/gocode), with golang-go (Go 1.19); the tests build it this way:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 go build -o goi .
//
// Usage: EP=http://127.0.0.1:2379 goi COMMAND ARGS... (see main below). Every line it
// prints is `EVENT UNIX-NANOS [FIELD...]`, fields separated by single spaces (values must
// not contain whitespace). A HOLD argument is a Go duration ("50ms") or "-": wait for a
// line (or EOF) on stdin. Errors go to stderr, with exit status 1; a bwait that times out
// prints `timeout` and exits with status 3.
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
	recipe "go.etcd.io/etcd/contrib/recipes"
)

var stdin = bufio.NewReader(os.Stdin)

// emit prints one event line: EVENT UNIX-NANOS FIELDS...
func emit(event string, fields ...interface{}) {
	parts := []string{event, strconv.FormatInt(time.Now().UnixNano(), 10)}
	for _, f := range fields {
		parts = append(parts, fmt.Sprint(f))
	}
	fmt.Println(strings.Join(parts, " "))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "goi:", err)
		os.Exit(1)
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	check(err)
	return n
}

// hold sleeps for spec, or waits for a line on stdin if spec is "-".
func hold(spec string) {
	if spec == "-" {
		_, _ = stdin.ReadString('\n')
		return
	}
	d, err := time.ParseDuration(spec)
	check(err)
	time.Sleep(d)
}

func main() {
	if len(os.Args) < 3 {
		check(fmt.Errorf("usage: EP=URL goi COMMAND NAME ARGS..."))
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{os.Getenv("EP")},
		DialTimeout: 5 * time.Second,
	})
	check(err)
	defer cli.Close()
	ctx := context.Background()
	session := func() *concurrency.Session {
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
		check(err)
		return s
	}
	cmd, name, a := os.Args[1], os.Args[2], os.Args[3:]
	switch cmd {
	case "lock": // lock NAME HOLD [ROUNDS]
		s := session()
		rounds := 1
		if len(a) > 1 {
			rounds = atoi(a[1])
		}
		for i := 0; i < rounds; i++ {
			m := concurrency.NewMutex(s, name)
			emit("waiting")
			check(m.Lock(ctx))
			emit("acquired", m.Key())
			hold(a[0])
			emit("releasing")
			check(m.Unlock(ctx))
			emit("released")
		}
	case "rlock", "wlock": // rlock NAME HOLD [ROUNDS]
		s := session()
		rounds := 1
		if len(a) > 1 {
			rounds = atoi(a[1])
		}
		for i := 0; i < rounds; i++ {
			m := recipe.NewRWMutex(s, name)
			emit("waiting")
			if cmd == "rlock" {
				check(m.RLock())
			} else {
				check(m.Lock())
			}
			emit("acquired")
			hold(a[0])
			emit("releasing")
			if cmd == "rlock" {
				check(m.RUnlock())
			} else {
				check(m.Unlock())
			}
			emit("released")
		}
	case "campaign": // campaign NAME VALUE HOLD [PROCLAIM HOLD]...
		e := concurrency.NewElection(session(), name)
		emit("waiting")
		check(e.Campaign(ctx, a[0]))
		emit("leader", e.Key(), e.Rev())
		hold(a[1])
		for i := 2; i+1 < len(a); i += 2 {
			check(e.Proclaim(ctx, a[i]))
			emit("proclaimed", a[i])
			hold(a[i+1])
		}
		check(e.Resign(ctx))
		emit("resigned")
	case "leader": // leader NAME
		e := concurrency.NewElection(session(), name)
		r, err := e.Leader(ctx)
		if err == concurrency.ErrElectionNoLeader {
			emit("noleader")
			return
		}
		check(err)
		emit("leader", string(r.Kvs[0].Value), string(r.Kvs[0].Key))
	case "observe": // observe NAME COUNT TIMEOUT: the first COUNT observations
		e := concurrency.NewElection(session(), name)
		d, err := time.ParseDuration(a[1])
		check(err)
		c, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		emit("observing")
		n := atoi(a[0])
		for r := range e.Observe(c) {
			emit("observed", string(r.Kvs[0].Value), string(r.Kvs[0].Key))
			if n--; n == 0 {
				return
			}
		}
		emit("timeout")
	case "bhold": // bhold NAME
		check(recipe.NewBarrier(cli, name).Hold())
		emit("held")
	case "brelease": // brelease NAME
		check(recipe.NewBarrier(cli, name).Release())
		emit("released")
	case "bwait": // bwait NAME TIMEOUT
		d, err := time.ParseDuration(a[0])
		check(err)
		done := make(chan error, 1)
		emit("waiting")
		go func() { done <- recipe.NewBarrier(cli, name).Wait() }()
		select {
		case err := <-done:
			check(err)
			emit("passed")
		case <-time.After(d):
			emit("timeout")
			os.Exit(3)
		}
	case "dbarrier": // dbarrier NAME COUNT HOLD
		b := recipe.NewDoubleBarrier(session(), name, atoi(a[0]))
		emit("entering")
		check(b.Enter())
		emit("entered")
		hold(a[1])
		emit("leaving")
		check(b.Leave())
		emit("left")
	case "enqueue": // enqueue NAME VALUE...
		q := recipe.NewQueue(cli, name)
		for _, v := range a {
			check(q.Enqueue(v))
			emit("enqueued", v)
		}
	case "dequeue": // dequeue NAME COUNT
		q := recipe.NewQueue(cli, name)
		for i := atoi(a[0]); i > 0; i-- {
			v, err := q.Dequeue()
			check(err)
			emit("dequeued", v)
		}
	case "penqueue": // penqueue NAME PRIORITY VALUE [PRIORITY VALUE]...
		q := recipe.NewPriorityQueue(cli, name)
		for i := 0; i+1 < len(a); i += 2 {
			check(q.Enqueue(a[i+1], uint16(atoi(a[i]))))
			emit("enqueued", a[i+1])
		}
	case "pdequeue": // pdequeue NAME COUNT
		q := recipe.NewPriorityQueue(cli, name)
		for i := atoi(a[0]); i > 0; i-- {
			v, err := q.Dequeue()
			check(err)
			emit("dequeued", v)
		}
	default:
		check(fmt.Errorf("unknown command %q", cmd))
	}
}
