// Command libcni-client is a small cnitool work-alike built on libcni, the
// library inside cnitool, containerd and podman. It exists because cnitool is
// not packaged in Debian while libcni is (golang-github-appc-cni-dev), so the
// real-clients test can drive our plugins through the same code real runtimes
// use. It builds offline in GOPATH mode:
//
//	GO111MODULE=off GOPATH=$tmp:/usr/share/gocode go build -o $tmp/libcni-client .
//
// Usage (as cnitool):
//
//	libcni-client [--cache-dir DIR] [--container-id ID] add|check|del NETWORK-NAME NETNS-PATH
//
// Environment (as cnitool): NETCONFPATH (conflist dir, default /etc/cni/net.d),
// CNI_PATH (plugin dirs, ':'-separated), CNI_ARGS ("K=V;K=V"), CAP_ARGS
// (JSON object of capability arguments, e.g. portMappings), CNI_IFNAME
// (default eth0). Unlike cnitool, the libcni result cache has no default
// (cnitool's is the machine's /var/lib/cni): it is --cache-dir, else
// $CNI_CACHE_DIR, and one of them is required.
//
// Two additions for the test, neither used in the cnitool role:
// --container-id overrides the ID that cnitool derives from the netns path, and
// an empty NETNS-PATH is passed on empty. Together they let the test send the
// DEL that another runtime owed (containerd 1.6's `ctr run -d` never sends one),
// exactly as that runtime would have sent it: its container ID, its result
// cache, and no netns.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

const (
	envCNIPath        = "CNI_PATH"
	envNetDir         = "NETCONFPATH"
	envCapabilityArgs = "CAP_ARGS"
	envCNIArgs        = "CNI_ARGS"
	envCNIIfname      = "CNI_IFNAME"
	envCacheDir       = "CNI_CACHE_DIR"
	defaultNetDir     = "/etc/cni/net.d"
)

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s [--cache-dir DIR] [--container-id ID] add|check|del NETWORK-NAME NETNS-PATH\n", filepath.Base(os.Args[0]))
	fmt.Fprintf(os.Stderr, "env: %s, %s, %s, %s, %s, %s\n", envNetDir, envCNIPath, envCNIArgs, envCapabilityArgs, envCNIIfname, envCacheDir)
	os.Exit(2)
}

func fail(err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "libcni-client: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// parseArgs splits CNI_ARGS exactly as cnitool does.
func parseArgs(args string) ([][2]string, error) {
	var result [][2]string
	for _, pair := range strings.Split(args, ";") {
		kv := strings.Split(pair, "=")
		if len(kv) != 2 || kv[0] == "" || kv[1] == "" {
			return nil, fmt.Errorf("invalid %s pair %q", envCNIArgs, pair)
		}
		result = append(result, [2]string{kv[0], kv[1]})
	}
	return result, nil
}

func main() {
	cacheDir := flag.String("cache-dir", os.Getenv(envCacheDir), "libcni result cache directory (default $"+envCacheDir+")")
	containerIDFlag := flag.String("container-id", "", "container ID (default: cnitool's, derived from NETNS-PATH)")
	timeout := flag.Duration("timeout", 60*time.Second, "bound on the whole operation")
	flag.Usage = usage
	flag.Parse()
	if flag.NArg() != 3 {
		usage()
	}
	cmd, name, netns := flag.Arg(0), flag.Arg(1), flag.Arg(2)
	if *cacheDir == "" {
		fail(fmt.Errorf("no result cache dir: set --cache-dir or $%s (refusing the system default)", envCacheDir))
	}

	netdir := os.Getenv(envNetDir)
	if netdir == "" {
		netdir = defaultNetDir
	}
	netconf, err := libcni.LoadConfList(netdir, name)
	if err != nil {
		fail(err)
	}

	var capabilityArgs map[string]interface{}
	if v := os.Getenv(envCapabilityArgs); v != "" {
		if err := json.Unmarshal([]byte(v), &capabilityArgs); err != nil {
			fail(fmt.Errorf("%s: %v", envCapabilityArgs, err))
		}
	}
	var cniArgs [][2]string
	if v := os.Getenv(envCNIArgs); v != "" {
		if cniArgs, err = parseArgs(v); err != nil {
			fail(err)
		}
	}
	ifName, ok := os.LookupEnv(envCNIIfname)
	if !ok {
		ifName = "eth0"
	}

	if netns != "" {
		if netns, err = filepath.Abs(netns); err != nil {
			fail(err)
		}
	}
	// Like cnitool: the container ID is derived from the netns path.
	s := sha512.Sum512([]byte(netns))
	containerID := fmt.Sprintf("cnitool-%x", s[:10])
	if *containerIDFlag != "" {
		containerID = *containerIDFlag
	}

	cninet := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv(envCNIPath)), *cacheDir, nil)
	rt := &libcni.RuntimeConf{
		ContainerID:    containerID,
		NetNS:          netns,
		IfName:         ifName,
		Args:           cniArgs,
		CapabilityArgs: capabilityArgs,
		CacheDir:       *cacheDir,
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	switch cmd {
	case "add":
		result, err := cninet.AddNetworkList(ctx, netconf, rt)
		if result != nil {
			_ = result.Print()
		}
		fail(err)
	case "check":
		fail(cninet.CheckNetworkList(ctx, netconf, rt))
	case "del":
		fail(cninet.DelNetworkList(ctx, netconf, rt))
	default:
		usage()
	}
}
