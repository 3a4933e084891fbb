#!/usr/bin/env python3
# A socat relay's CPU per 64-byte round trip, to set beside `load pingpong`'s
# per-process figures: an echo server and a client in this process, one
# `socat -b 131072` relay between them (as ../shared/peers runs it), 8 s of
# round trips one after another, then socat's CPU (/proc/PID/stat) over them.
#   python3 benches/peers/socat_cpu.py        (Debian: apt-get install socat)
import socket, threading, subprocess, time, os, sys
def free_port():
    # A port the kernel has free on loopback now (fixed ports clashed with
    # other programs' ephemeral ports).
    s=socket.socket(); s.bind(('127.0.0.1',0)); p=s.getsockname()[1]; s.close(); return p
def echo_srv(s):
    def h(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
        while True:
            d=c.recv(65536)
            if not d: return
            c.sendall(d)
    while True:
        c,_=s.accept(); threading.Thread(target=h,args=(c,),daemon=True).start()
srv=socket.socket(); srv.bind(('127.0.0.1',0)); srv.listen()
threading.Thread(target=echo_srv,args=(srv,),daemon=True).start()
relay=free_port()
p=subprocess.Popen(['socat','-b','131072',f'TCP-LISTEN:{relay},bind=127.0.0.1,reuseaddr,nodelay',
                    f'TCP:127.0.0.1:{srv.getsockname()[1]},nodelay'])
for _ in range(100):  # socat listens within a few milliseconds; 5 s at most
    try: c=socket.create_connection(('127.0.0.1',relay)); break
    except ConnectionRefusedError:
        if p.poll() is not None: sys.exit('socat exited')
        time.sleep(0.05)
else: sys.exit('socat did not listen within 5 s')
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
def cpu(pid):
    f=open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK')
msg=b'x'*64
for _ in range(200): c.sendall(msg); c.recv(64)
t0=time.time(); c0=cpu(p.pid); n=0
while time.time()-t0<8:
    c.sendall(msg); got=0
    while got<64:
        d=c.recv(64-got)
        if not d: sys.exit('socat closed the connection')
        got+=len(d)
    n+=1
el=time.time()-t0; cc=cpu(p.pid)-c0
print(f'socat: {n} round trips, {el/n*1e6:.0f} us each, socat CPU {cc/n*1e6:.1f} us per round trip')
p.kill()
