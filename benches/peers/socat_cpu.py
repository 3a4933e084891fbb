#!/usr/bin/env python3
# A socat relay's CPU per 64-byte round trip, to set beside `load pingpong`'s
# per-process figures: an echo server and a client in this process, one
# `socat -b 131072` relay between them (as ../shared/peers runs it), 8 s of
# round trips one after another, then socat's CPU (/proc/PID/stat) over them.
#   python3 benches/peers/socat_cpu.py        (Debian: apt-get install socat)
import socket, threading, subprocess, time, os, sys
def echo_srv(port):
    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,1); s.bind(('127.0.0.1',port)); s.listen()
    def h(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
        while True:
            d=c.recv(65536)
            if not d: return
            c.sendall(d)
    while True:
        c,_=s.accept(); threading.Thread(target=h,args=(c,),daemon=True).start()
threading.Thread(target=echo_srv,args=(39001,),daemon=True).start()
time.sleep(0.2)
p=subprocess.Popen(['socat','-b','131072','TCP-LISTEN:39002,reuseaddr,nodelay','TCP:127.0.0.1:39001,nodelay'])
time.sleep(0.3)
c=socket.create_connection(('127.0.0.1',39002)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
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
