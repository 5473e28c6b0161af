# The client and server of the benchmarks' TCP figures (xtask/src/bench:
# tunnel, wan), one program on every path so that every path is measured
# with the same tool. `serve PORT`; clients, each printing its figures:
#   down HOST PORT MIB STREAMS [SECONDS]  Mbit/s received (MIB per stream, or what came in SECONDS)
#   http HOST PORT COUNT                  each keep-alive request's round trip, ms
#   conns HOST PORT COUNT                 new connections (connect, 16-byte echo) per second
#   first HOST PORT COUNT                 each new connection's first response (connect + echo), ms
#   dns SERVER NAME COUNT / dnseach SERVER NAME{} COUNT [tolerate]   DNS p50, ms (and with
#                                         `tolerate`, the queries that failed)
import socket, sys, time, threading
mode = sys.argv[1]
def serve(port):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(('0.0.0.0', port)); srv.listen(512)
    buf = b'\0' * 262144
    def handle(c):
        try:
            head = b''
            while len(head) < 16:
                b = c.recv(16 - len(head))
                if not b: return
                head += b
            if head[:1] == b'd':
                left = int(head[1:])
                while left > 0: left -= c.send(buf[:min(left, len(buf))])
            elif head[:1] == b'e':
                c.sendall(head)
            elif head[:1] == b'h':
                f = c.makefile('rb')
                while True:
                    line = f.readline()
                    if not line: return
                    c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok')
        except OSError:
            pass  # the client went first, e.g. a download that had its SECONDS
        finally:
            c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def down(host, port, mib, streams, seconds=None):
    n = mib * 1048576
    failed = []
    got = [0] * streams
    def one(i):
        try:
            s = socket.create_connection((host, port)); s.sendall(b'd' + str(n).encode().rjust(15))
            if seconds: s.settimeout(seconds + 10)
            while got[i] < n and not (seconds and time.time() - t > seconds):
                b = s.recv(1048576)
                if not b: raise EOFError('short read: %d of %d bytes' % (got[i], n))
                got[i] += len(b)
            s.close()
        except Exception as e:
            failed.append(e)
    # Daemon threads: an interrupted run must not wait for a stream whose
    # tunnel is gone.
    ts = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
    t = time.time(); [x.start() for x in ts]; [x.join() for x in ts]
    if failed: raise SystemExit('download failed: %s' % failed[0])
    print(sum(got) * 8 / (time.time() - t) / 1e6)
def http(host, port, count):
    s = socket.create_connection((host, port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b'h' + b' ' * 15)
    f = s.makefile('rb'); lat = []
    for _ in range(count):
        t = time.perf_counter(); s.sendall(b'GET / HTTP/1.1\r\n')
        while f.readline().strip(): pass
        f.read(2); lat.append((time.perf_counter() - t) * 1000)
    print(' '.join('%.4f' % x for x in lat))
def conns(host, port, count):
    t = time.time()
    for _ in range(count):
        s = socket.create_connection((host, port)); s.sendall(b'e' + b' ' * 15); s.recv(16); s.close()
    print(count / (time.time() - t))
def first(host, port, count):
    lat = []
    for _ in range(count):
        t = time.perf_counter()
        s = socket.create_connection((host, port)); s.sendall(b'e' + b' ' * 15)
        got = b''
        while len(got) < 16:
            b = s.recv(16 - len(got))
            if not b: raise SystemExit('connection closed before its answer')
            got += b
        lat.append((time.perf_counter() - t) * 1000); s.close()
    print(' '.join('%.4f' % x for x in lat))
def dns(server, names, skip=0, tolerate=False):
    # Raw A queries over UDP to `server`, one per name: the resolver's
    # time, not the C library's. The first `skip` warm a cache. With
    # `tolerate`, a query answered with an error or not in 5 s is counted
    # (printed after the p50) and left out of the p50 instead of failing.
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect((server, 53))
    lat = []; failed = 0
    for i, name in enumerate(names):
        q = struct.pack('>6H', i, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(p)]) + p.encode() for p in name.split('.') if p)
        q += b'\0' + struct.pack('>HH', 1, 1)
        t = time.perf_counter(); s.send(q)
        try:
            r = s.recv(4096)
            while r[:2] != q[:2]: r = s.recv(4096)
        except socket.timeout:
            if not tolerate: raise SystemExit('no answer for %s in 5 s' % name)
            failed += 1; continue
        ms = (time.perf_counter() - t) * 1000
        if r[3] & 15 or r[6:8] == b'\0\0':
            if not tolerate: raise SystemExit('no address for %s (rcode %d)' % (name, r[3] & 15))
            failed += 1; continue
        if i >= skip: lat.append(ms)
    lat = sorted(lat); p50 = lat[len(lat) // 2] if lat else float('nan')
    print(p50, failed) if tolerate else print(p50)
a = sys.argv[2:]
if mode == 'serve': serve(int(a[0]))
elif mode == 'down': down(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]) if a[4:] else None)
elif mode == 'http': http(a[0], int(a[1]), int(a[2]))
elif mode == 'conns': conns(a[0], int(a[1]), int(a[2]))
elif mode == 'first': first(a[0], int(a[1]), int(a[2]))
elif mode == 'dns': dns(a[0], [a[1]] * (int(a[2]) + 1), skip=1, tolerate=a[3:] == ['tolerate'])
elif mode == 'dnseach': dns(a[0], [a[1].replace('{}', str(i)) for i in range(int(a[2]))], tolerate=a[3:] == ['tolerate'])
