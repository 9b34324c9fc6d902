/* The anchor for the media relay: the least a UDP relay can do, in C (not our product).
 *
 * One socket on 127.0.0.1, port 0 (the port is printed on stdout). A datagram "R" + flow
 * (u32, big endian) latches the sender's address as that flow's receiver. Any other datagram
 * carries its flow in its first 4 bytes and is forwarded unchanged to the flow's receiver.
 * recvmmsg/sendmmsg move up to BATCH datagrams per system call. No crypto, no replay window:
 * this is the machine's ceiling for "receive, look up, send", which the Python relay is
 * compared with. Built by bench/run.py: gcc -O2 -o bench/results/c_relay bench/c_relay.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define MAX_FLOWS 65536
#define SIZE 2048

static struct sockaddr_in receivers[MAX_FLOWS];
static unsigned char latched[MAX_FLOWS];

int main(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int rcvbuf = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("bind");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);

    static unsigned char bufs[BATCH][SIZE];
    static struct sockaddr_in from[BATCH];
    static struct iovec iov[BATCH], out_iov[BATCH];
    static struct mmsghdr in[BATCH], out[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = SIZE;
        in[i].msg_hdr.msg_iov = &iov[i];
        in[i].msg_hdr.msg_iovlen = 1;
        in[i].msg_hdr.msg_name = &from[i];
    }
    for (;;) {
        for (int i = 0; i < BATCH; i++) in[i].msg_hdr.msg_namelen = sizeof from[i];
        int n = recvmmsg(fd, in, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        int m = 0;
        for (int i = 0; i < n; i++) {
            unsigned char *p = bufs[i];
            unsigned int size = in[i].msg_len;
            if (size < 4) continue;
            if (p[0] == 'R' && size >= 5) {
                uint32_t flow = ((uint32_t)p[1] << 24) | (p[2] << 16) | (p[3] << 8) | p[4];
                if (flow < MAX_FLOWS) {
                    receivers[flow] = from[i];
                    latched[flow] = 1;
                }
                continue;
            }
            uint32_t flow = ((uint32_t)p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
            if (flow >= MAX_FLOWS || !latched[flow]) continue;
            out_iov[m].iov_base = p;
            out_iov[m].iov_len = size;
            memset(&out[m].msg_hdr, 0, sizeof out[m].msg_hdr);
            out[m].msg_hdr.msg_iov = &out_iov[m];
            out[m].msg_hdr.msg_iovlen = 1;
            out[m].msg_hdr.msg_name = &receivers[flow];
            out[m].msg_hdr.msg_namelen = sizeof receivers[flow];
            m++;
        }
        int sent = 0;
        while (sent < m) {
            int k = sendmmsg(fd, out + sent, m - sent, 0);
            if (k <= 0) break; /* a full buffer drops the rest, as a relay would */
            sent += k;
        }
    }
}
